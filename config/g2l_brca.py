# The G2L recipe (arXiv 2510.11176): H-optimus-0 (ViT-g/14, 1.1B) -> Hibou-L (ViT-L/14, 0.3B),
# pretrained student, 1K TCGA-BRCA slides tiled at 0.5 um/px into 256 px tiles:
#   python tile.py /data/tcga-brca --out tiles/brca --mpp 0.5 --tile 256 --workers 32
#   torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py
# Both models are gated on the Hugging Face hub: request access on their pages and set HF_TOKEN,
# or download them once and point teacher_weights / student_weights at the local files.
# From the paper: the models, data, crop, augmentation, loss, lr, weight decay, cosine schedules,
# batch 32, early stop. Ours (the paper does not give them): warm-up, length, min_lr, clipping,
# and that 32 is per GPU (G2L ran 3 RTX A6000; 8 GPUs here make a global batch of 256 at the
# same lr).
out_dir = 'out/g2l_brca'
data_dir = 'tiles/brca'
teacher = 'H-optimus-0'
student = 'Hibou-L'
batch_size = 32  # per GPU (G2L: 32 on 3x RTX A6000, per GPU or in all is not stated)
crop_size = 224
loss = 'g2l'
alpha = 4.0
lr = 1e-4
weight_decay = 0.05  # cosine-scheduled in G2L, end value not given: weight_decay_end stays 0.05
warmup_iters = 1000  # ours
max_iters = 60000  # ours: an upper bound; the paper's early stop usually ends the run first
min_lr = 1e-6  # ours
grad_clip = 1.0  # ours
early_stop = True  # the paper's stopping rule
num_workers = 10
resume = True  # a requeued job continues from out_dir/ckpt.pt
# The teacher is 55% of the FLOPs of a step. To pay it once for a whole sweep, fill a teacher
# cache ahead (~47 GB for 60K steps x 256 tiles; see the README) and rerun with it:
#   torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py \
#       --teacher_cache=/scratch/brca_hopt0 --teacher_only=True
# The run ends with the G2L table (out_dir/eval/results.md): H-optimus-0, Hibou-L before and after
# distillation, side by side on your own labelled patches of this cancer, e.g. TCGA-BRCA tiles
# labelled by tissue or TIL status: a CSV path,label,split[,center][,slide] (a center column adds
# the robustness index, a slide column the slide level) or an ImageFolder root. Checked at the
# start, so a wrong path stops the run before training. '' skips it:
#   eval_data = '/data/brca_patches/labels.csv'
eval_data = ''
