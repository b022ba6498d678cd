# The CPU demo: tiny random-init teacher and student, four synthetic slides written and tiled on
# first use (one held out for the teacher-student cosine). About two minutes on 2 CPU cores.
#   torchrun --standalone --nproc_per_node=1 distill.py config/demo.py
out_dir = 'out/demo'
data_dir = 'data/demo/tiles'
synthetic_slides = 4
val_fraction = 0.25  # one of the four slides
val_tiles = 64
teacher = 'tiny-teacher'
student = 'tiny-student'
batch_size = 16
num_workers = 1
max_iters = 150
warmup_iters = 20
# measured: at 6e-4 and 1e-3 the held-out cosine peaks at step 50 (0.45, 0.42), then falls
lr = 3e-4
min_lr = 1e-5
log_interval = 25  # each printed loss is the mean of 25 steps
eval_interval = 25
ckpt_interval = 50
device = 'cpu'
compile = False  # on CPU compiling costs about a minute and saves nothing
resume = True  # rerunning the demo continues (or just re-exports) instead of refusing
