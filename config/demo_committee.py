# The CPU demo of why a committee of teachers beats one, in one command on 2 CPU cores:
#   torchrun --standalone --nproc_per_node=1 distill.py config/demo_committee.py
# Two questions about the same synthetic tissue: which cells (tumour or lymphocytes) and which
# matrix is around them (collagenous, pink; or myxoid, lilac). On first use it makes what it lacks
# (data/demo_committee/): eight slides, half of them myxoid, tiled; a labelled patch set of the
# four kinds; and two demo teachers, each trained on one question and blind to the other by
# construction: the cells teacher sees brightness only, where the two matrices are one; the
# matrix teacher only the axis of colour that tells the matrices apart, where the nuclei do not
# show. Then it distils both into a random tiny student and ends with the table
# (out/demo_committee/eval/results.md): each teacher, student before and after, on the four-kind
# task that needs both answers. A student of either teacher alone: add
#   --teacher=tiny-teacher --teacher_weights=data/demo_committee/cells_teacher.safetensors
#   --out_dir=out/demo_cells
out_dir = 'out/demo_committee'
data_dir = 'data/demo_committee/tiles'
synthetic_demo = 'committee'
synthetic_slides = 8
eval_data = 'data/demo_committee/patches/labels.csv'
val_fraction = 0.125  # one of the eight slides
val_tiles = 64
teacher = 'tiny-teacher,tiny-teacher'
# trained on first use (demo/material.py: train_demo_teacher), then reused
teacher_weights = ('data/demo_committee/cells_teacher.safetensors,'
                   'data/demo_committee/matrix_teacher.safetensors')
demo_teacher_steps = 150
student = 'tiny-student'
batch_size = 16
num_workers = 1
max_iters = 300
warmup_iters = 20
lr = 1e-3
min_lr = 1e-5
log_interval = 25
eval_interval = 100
ckpt_interval = 100
device = 'cpu'
compile = False  # on CPU compiling costs about a minute and saves nothing
resume = True  # rerunning the demo continues (or just re-exports) instead of refusing
