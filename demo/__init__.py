"""The demo's and the tests' material, apart from the method: synthetic slides, tissues, stains
and labelled patches (synthetic.py), and what the demo makes on first use, including its stand-in
teacher (material.py)."""
