# The CPU demo of the whole G2L story, in one command on 2 CPU cores without network:
#   torchrun --standalone --nproc_per_node=1 distill.py config/demo.py
# On first use it makes what it lacks (data/demo/): eight synthetic slides with three tissues that
# differ in their nuclei, not in colour, from two centres that stain differently, tiled; a labelled
# patch set of the same tissues; and the demo teacher: tiny-teacher trained on the tissue labels,
# a stand-in for a giga model's pretraining. Then it distils the teacher into a random tiny
# student and ends with the G2L table (out/demo/eval/results.md): teacher, student before and after.
# Tiles of an older demo or other settings are refused, not reused (data/demo/tiles/demo.json says
# what made them): delete data/demo/tiles and out/demo when told to.
out_dir = 'out/demo'
data_dir = 'data/demo/tiles'
synthetic_slides = 8
eval_data = 'data/demo/patches/labels.csv'
val_fraction = 0.125  # one of the eight slides
val_tiles = 64
teacher = 'tiny-teacher'
# trained on first use (demo/material.py: train_demo_teacher), then reused
teacher_weights = 'data/demo/teacher.safetensors'
# random init: the real recipe starts from pretrained Hibou-L; the demo shows the effect starkly
student = 'tiny-student'
batch_size = 16
num_workers = 1
max_iters = 300
warmup_iters = 20
lr = 1e-3
min_lr = 1e-5
log_interval = 25  # each printed loss is the mean of 25 steps
eval_interval = 100
ckpt_interval = 100
device = 'cpu'
compile = False  # on CPU compiling costs about a minute and saves nothing
resume = True  # rerunning the demo continues (or just re-exports) instead of refusing
