# Check the G2L claim on your own breast data (arXiv 2510.11176): the giga teacher, the student
# before distillation and after, side by side, teacher first:
#   python evaluate.py config/eval_brca.py
# On several GPUs, a process per model embeds only (--extract_only=True --models=ONE_ENTRY, each
# with its own CUDA_VISIBLE_DEVICES), then the line above scores every row from their files; the
# commands are in evaluate.py's docstring.
# Patches with labels in a CSV path,label,split[,center][,slide]; with a center column (the
# hospital or scanner of each patch) the robustness index is reported, with a slide column the
# slide-level probes too.
# Both hub models are gated: point NAME=WEIGHTS at local copies (a file or a snapshot folder).
data = 'data/brca_patches/labels.csv'
# the teacher, the student before distillation, and out/g2l_brca: distill.py's export
models = 'H-optimus-0=/data/hf/H-optimus-0,Hibou-L=/data/hf/hibou-L,out/g2l_brca'
teacher = 'H-optimus-0'
out = 'out/eval_brca'
batch_size = 256  # a ViT-g forward in bf16 fits easily on one 80 GB GPU at 224 px
num_workers = 16
# the row names, one per entry of models, teacher first; "closes X% of the gap" is measured from
# the second (the student before distillation) to the teacher
names = 'H-optimus-0,Hibou-L,Hibou-L distilled'
# Slide level: a CSV slide,label,split[,center] (e.g. each TCGA-BRCA slide's PAM50 subtype or TP53
# status; slide = the stem tile.py wrote, or the slide's path) and the tiles folder tile.py wrote.
# Every tile of each slide is embedded once into out/eval_brca/features/<model>/<stem>.h5
# (TRIDENT's layout; reruns skip finished slides), then ABMIL and mean-pooled probes are scored.
# With slides set, the slide level is theirs: the patches' slide column then goes unused.
slides = 'data/brca_slides.csv'
tiles = 'tiles/brca'
