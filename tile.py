"""
Tile whole-slide images at a physical resolution (µm/px) for G2L distillation.

For each slide: find tissue on the coarsest pyramid level that still resolves a tile (HSV
saturation + Otsu as in CLAM, a fixed threshold when there is no glass), lay a grid of
non-overlapping TILE_SIZE px tiles at MPP µm/px, keep those at least MIN_TISSUE tissue and save
their level-0 top-left x,y (int64 N×2, as in TRIDENT) with a QC picture.
TileDataset reads the tiles later, for distill.py and evaluate.py.

  # CPU demo: synthetic slides -> tiles -> bench
  python tile.py --demo /tmp/g2l_demo
  # every slide below a folder (recursive), 16 at a time
  python tile.py /data/TCGA-BRCA --out tiles/brca --workers 16
  # slides whose metadata lacks mpp
  python tile.py slides/ --out tiles --slide-mpp 0.25 --mpp-csv mpp.csv
  # job array: shard I of N
  python tile.py /data/TCGA-BRCA --out tiles/brca --shard $SLURM_ARRAY_TASK_ID/64
  # TileDataset vs bare read_region, tiles/s
  python tile.py --bench tiles/brca

Outputs in --out: <stem>.npz (coords, tissue, level, read_size, tile_size, mpp, min_tissue,
slide_mpp, slide_path, and the slide file's identity: slide_bytes, slide_mtime_ns,
slide_dimensions, slide_hash), <stem>.jpg (QC: tissue outline in green, kept tiles in blue) and
manifest.csv, a row per slide, kept across batches: a batch merges its rows into it by stem (shard
I of N writes manifest-I-of-N.csv, and the last shard to finish merges them). <stem> is the
slide's file stem; its file name (X.tiff beside X.svs) or either with a hash of its folder (a/X.svs,
b/X.svs) when that is not unique; the manifest maps stems to paths. Finished slides are skipped on
a rerun, and slides changed since they were tiled (or whose .npz is unreadable) are tiled again.
One run writes into --out at a time (shards of one job together); Ctrl-C stops after the slides in
flight, with the manifest written. The exit status is 0 only when every slide succeeded.
"""
import argparse
import collections
import contextlib
import csv
import errno
import fcntl
import functools
import hashlib
import io
import math
import numbers
import os
import re
import signal
import socket
import stat
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import openslide
import simplejpeg
import tifffile
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage
from tqdm import tqdm

# target µm/px of a tile: H-optimus-0 and G2L work at 0.5 µm/px (~20x)
MPP = 0.5
# tile side in px at MPP: G2L cuts non-overlapping 256 px tiles, then random-crops 224
TILE_SIZE = 256
# keep a tile when at least half of it is tissue, our choice: CLAM keeps a tile if 1 of 4 points
# ±1/4 tile from its centre is in tissue ('four_pt'), TRIDENT's --min_tissue_proportion is 0
MIN_TISSUE = 0.5
# a level up to 5% coarser than MPP still counts as "not coarser": scanners' 20x is 0.46-0.50
MPP_SLACK = 0.05
# µm/px that a scan (level 0) or a tile can have: 72 or 300 dpi (353 or 85 µm/px) is a default of
# a non-scanner tool, and scanners stop at 0.1-0.25 (60x-40x)
MPP_RANGE = (0.05, 50.0)
# read exactly TILE_SIZE px when within 2%: TRIDENT reads a 20x level as 20x, no resize
SNAP = 0.02
# thumbnail px per tile side where tissue is found: a tile's tissue fraction is then in 1/64s
SEG_TILE_PX = 8
# never segment coarser than this µm/px (CLAM segments 40x scans at downsample 64, 16 µm/px):
# a pen stroke, a hole or a speck is still several thumbnail px wide
SEG_MPP = 16.0
# Otsu's floor (of 255): glass is S < 10 even under JPEG noise, eosin-pale stroma S > 40,
# so a blank slide (where Otsu splits noise) finds nothing
OTSU_FLOOR = 20
# the fixed threshold when there is no glass to split off (a crop, a resection filling the scan),
# as in CLAM's presets (use_otsu FALSE, sthresh 8 in tcga.csv, 15 in bwh_biopsy.csv); 20 keeps the
# floor's margin above glass, so the lumen and holes of an all-tissue scan stay background
FIXED_SATURATION = 20
# the class below Otsu's threshold is glass when its mean green is above this: glass lets the
# light through, tinted or not (yellowish glass absorbs blue), and both H&E stains absorb green
# most. 180 is an optical density of 0.15 in green, Macenko et al. 2009's beta for transparent
# pixels. Saturation cannot tell: tinted glass is S 24-55, as saturated as pale eosin (measured on
# synthetic slides: glass classes' green 200-244, all-tissue crops' lower class 116-146)
GLASS_GREEN = 180
# darker pixels are black ink, folds' shadows or the slide edge, not stained tissue
MIN_VALUE = 40
# G > R + 20 is blue/green/teal marker: both H&E stains absorb green most, so tissue has G < R
INK_MARGIN = 20
# tissue pieces smaller than this are dust or debris (CLAM's a_t area filter); ~1 tile
MIN_PIECE_MM2 = 0.02
# holes smaller than this are filled (gaps between cells); bigger ones (lumen, fat) stay holes
MAX_HOLE_MM2 = 0.02
# read whole through PIL, as one level
PLAIN_IMAGES = {'.png', '.jpg', '.jpeg'}
# what OpenSlide 4 opens, plus plain images
SUFFIXES = {'.svs', '.tif', '.tiff', '.ndpi', '.vms', '.vmu', '.scn', '.mrxs', '.svslide', '.bif',
            '.czi', '.dcm'} | PLAIN_IMAGES
# slide handles a reading process keeps (least recently used closed first): OpenSlide's, ~0.4 MiB
# each on a small slide, more on a big one, reopened in ~1.5 ms on the synthetic SVS (~1 tile
# read); or, for a slide read straight from its JPEG tiles, an open file
MAX_OPEN_SLIDES = 64
# one decode cache shared by a process's handles: OpenSlide's default is 32 MiB per handle, tens of
# GB per worker over ~1K slides, and tiles read in random order almost never hit it anyway
SLIDE_CACHE_MB = 64
# slides whose tiles TileDataset reads straight from the stored JPEG tiles, by the vendor OpenSlide
# reads them as: their levels are plain grids of tiles in a TIFF page (others, such as NDPI, BIF
# with overlaps, MRXS, DICOM, go through OpenSlide)
DIRECT_VENDORS = {'aperio', 'generic-tiff'}
# shrink 2x, 4x or 8x inside the JPEG decoder (libjpeg-turbo's scaled IDCT) where a region is that
# multiple of the tile: 1.9x the tiles/s of a whole decode and box shrink, PSNR 46 dB against it on
# the synthetic nuclei texture. False: OpenSlide's pixels and box shrink exactly, at half the rate
DCT_SHRINK = True
# Adobe's APP14 JPEG segment (Adobe TN 5116) ending in its colour transform, by TIFF photometric:
# put in front of a stored tile, it tells the decoder the tile's colour space (RGB 2, YCbCr 6)
# instead of letting it guess, which turns RGB-coded Aperio tiles (ids 0, 1, 2) into false colours
ADOBE_MARKER = {2: b'\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00',
                6: b'\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01'}
# the QC picture's long side is upscaled (whole pixels) to at least this, so its tiles can be seen
QC_MIN_SIDE = 512
# a slide without OpenSlide's quickhash-1 (plain images, a smallest level too big to hash) is told
# apart by the hash of its first and last MiB: the header, the first and the last tiles written
SAMPLE_BYTES = 1 << 20
# what a writer killed mid-write leaves: save_atomic's .NAME.PID.tmp, and NAME.tmpPID, the other
# usual form of a temporary's name
TEMPORARY_NAMES = (re.compile(r'\..+\.(\d+)\.tmp'), re.compile(r'.+\.tmp(\d+)'))
# the columns of manifest.csv, a row per slide
COLUMNS = ['path', 'stem', 'status', 'n_tiles', 'slide_mpp', 'level', 'read_size', 'seconds',
           'error']
# plain PNG/JPEG scans are far bigger than PIL's decompression-bomb limit
Image.MAX_IMAGE_PIXELS = None


class SlideError(Exception):
    """An expected per-slide failure; its message is the one-line reason written to the manifest."""


def new_row(path, stem):
    """A manifest row of a slide not (yet) tiled: an error until it succeeds."""
    return dict.fromkeys(COLUMNS, '') | dict(path=path, stem=stem, status='error', n_tiles=0)


def npz_files(folder):
    """The <stem>.npz files of a tiles folder, sorted; hidden ones are save_atomic's temporaries."""
    return sorted(f for f in os.listdir(folder) if f.endswith('.npz') and not f.startswith('.'))


def load_tiles(path):
    """The arrays of a <stem>.npz as a dict; SlideError, one line, when it is unreadable."""
    # a write cut short (a full disk, a copy killed half-way) leaves a file that np.load cannot
    # open, or opens and fails on later: every array is read, and its CRC checked, here
    try:
        with np.load(path) as npz:
            record = {name: npz[name] for name in npz.files}
        missing = {'coords', 'level', 'read_size', 'tile_size', 'mpp', 'slide_path'} - set(record)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
    except Exception as e:
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())
        raise SlideError(f'{path} is unreadable ({reason}): truncated or corrupt; tile.py tiles '
                         'its slide again when that slide is among its inputs') from None
    return record


def readable_tiles(folder):
    """{stem: arrays} of the readable .npz files of a tiles folder; an unreadable one is skipped
    with a warning line."""
    records = {}
    for name in npz_files(folder):
        try:
            records[name.removesuffix('.npz')] = load_tiles(os.path.join(folder, name))
        except SlideError as e:
            print(f'warning: {e}', file=sys.stderr)
    return records


# ----------------------------------------------------------------------- slide metadata and levels

def open_slide(path):
    """OpenSlide for slide formats, openslide.ImageSlide (PIL) for plain images."""
    # a .tif that OpenSlide rejects is an error, not a PIL fallback: a truncated or strip-organised
    # TIFF would otherwise be decoded whole, or fail later
    try:
        if os.path.splitext(path)[1].lower() in PLAIN_IMAGES:
            return openslide.ImageSlide(path)
        return openslide.OpenSlide(path)
    except Exception as e:
        size_mib = os.path.getsize(path) / 2 ** 20 if os.path.exists(path) else 0
        raise SlideError(
            f"cannot open ({type(e).__name__}: {e}; {size_mib:.1f} MiB): truncated or corrupt, "
            "or a format OpenSlide 4 does not read (it reads SVS, NDPI, MRXS, SCN, BIF, CZI, "
            "DICOM, tiled TIFF); convert it with "
            "`vips tiffsave in out.tif --tile --pyramid --compression jpeg`") from None


def find_mpp(slide, path, mpp_table=None, default=None):
    """Level-0 µm/px: from --mpp-csv, else the metadata (TRIDENT's order), else --slide-mpp."""
    name = os.path.basename(path)
    # --mpp-csv names a slide by its path, its file name or its stem
    for key in (os.path.abspath(path), name, os.path.splitext(name)[0]):
        if mpp_table and key in mpp_table:
            return mpp_table[key]
    props = slide.properties
    # tiff.XResolution is in pixels per ResolutionUnit
    um_per_unit = {'centimeter': 1e4, 'inch': 25400.0}.get(props.get('tiff.ResolutionUnit'))
    x_resolution = props.get('tiff.XResolution')
    tiff_mpp = um_per_unit / float(x_resolution) if um_per_unit and x_resolution else None
    candidates = (props.get('openslide.mpp-x'), props.get('aperio.MPP'), tiff_mpp)
    found = next((float(m) for m in candidates if m), None)
    if found and MPP_RANGE[0] <= found <= MPP_RANGE[1]:
        return found
    if default:
        return default
    power = props.get('openslide.objective-power')
    hint = ''
    if found:
        hint += f' (it says {found:.4g} µm/px, not a scan resolution)'
    if power:
        hint += f' (objective {power}x suggests {10 / float(power):g})'
    raise SlideError(
        f"no mpp in the slide metadata{hint}; give the level-0 µm/px with --slide-mpp 0.25 "
        f"(all such slides) or a line '{name},0.25' in --mpp-csv (header slide,mpp)")


def pick_level(slide, slide_mpp, mpp, tile_size):
    """The coarsest level not coarser than mpp, and read_size: its pixels that cover one tile."""
    # 40x and 20x scans of the same glass then give tiles of the same µm
    # (CLAM reads 40x at a level as if 20x)
    level_mpps = [slide_mpp * d for d in slide.level_downsamples]
    coarsest_mpp = mpp * (1 + MPP_SLACK)
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= coarsest_mpp]
    if not fine_enough:
        raise SlideError(
            f"level 0 is {slide_mpp:.3f} µm/px, coarser than the target {mpp} µm/px; "
            f"tile at --mpp {slide_mpp:.3g} or coarser instead of inventing resolution")
    level = max(fine_enough, key=lambda i: level_mpps[i])
    read_size = round(tile_size * mpp / level_mpps[level])
    if abs(read_size - tile_size) <= SNAP * tile_size:
        read_size = tile_size
    return level, read_size


def slide_bounds(slide):
    """Level-0 (x, y, w, h) of the scanned area."""
    # MRXS and some others scan only a rectangle of the glass
    props, (width, height) = slide.properties, slide.dimensions
    x = int(props.get('openslide.bounds-x', 0))
    y = int(props.get('openslide.bounds-y', 0))
    w = int(props.get('openslide.bounds-width', width))
    h = int(props.get('openslide.bounds-height', height))
    return x, y, w, h


def read_thumbnail(slide, level, factor, bounds):
    """The bounds of pyramid `level` as uint8 RGB, shrunk by an integer `factor` (box average)."""
    x0, y0, w0, h0 = bounds
    downsample = slide.level_downsamples[level]
    width, height = max(1, int(w0 / downsample)), max(1, int(h0 / downsample))
    # read in bands of ~16 Mpx (whole multiples of factor rows), so a slide with no pyramid (one
    # huge level) never needs the whole level in memory
    band_rows = max(1, (1 << 24) // (width * factor)) * factor
    bands = []
    for y in range(0, height, band_rows):
        origin = (x0, y0 + round(y * downsample))
        rgba = np.asarray(slide.read_region(origin, level, (width, min(band_rows, height - y))))
        rgb, unscanned = rgba[..., :3], rgba[..., 3] == 0
        # unscanned (transparent) areas of MRXS and others are glass, not black tissue
        if unscanned.any():
            rgb = rgb.copy()
            rgb[unscanned] = 255
        bands.append(np.asarray(Image.fromarray(rgb).reduce(factor)))
    return np.concatenate(bands)


# ---------------------------------------------------------------------------------- slide identity

def slide_identity(slide, path):
    """What tells a later reader that the file at path is still the slide that was tiled: its
    size, mtime, level-0 dimensions and a hash of its content, as <stem>.npz stores them."""
    info = os.stat(path)
    return dict(slide_bytes=info.st_size, slide_mtime_ns=info.st_mtime_ns,
                slide_dimensions=np.array(slide.dimensions, np.int64),
                slide_hash=content_hash(slide, path, info.st_size))


def content_hash(slide, path, size):
    """OpenSlide's quickhash-1 of an open slide, else a hash of the file's first and last
    SAMPLE_BYTES."""
    # quickhash-1 hashes the properties and the smallest level's tiles as OpenSlide opens a slide:
    # it costs nothing more. A level-0 tile rotted in place keeps it, and TileDataset replaces
    # that tile when it fails to decode
    quickhash = slide.properties.get('openslide.quickhash-1')
    if quickhash:
        return quickhash
    return 'sample:' + sample_hash(path, size, SAMPLE_BYTES)


def sample_hash(path, size, sample_bytes):
    """A hash of the first and last sample_bytes of a file of `size` bytes."""
    sample = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as f:
        sample.update(f.read(sample_bytes))
        f.seek(max(0, size - sample_bytes))
        sample.update(f.read(sample_bytes))
    return sample.hexdigest()


def recorded_identity(record):
    """The identity of its slide that a tiles record holds, less the mtime (which a copy changes):
    {'bytes', 'dimensions', 'hash'}; None when the record holds none."""
    if 'slide_hash' not in record:
        return None
    return dict(bytes=int(record['slide_bytes']), dimensions=record['slide_dimensions'].tolist(),
                hash=str(record['slide_hash']))


def slide_change(record, path):
    """Why the file at path is not the slide a tiles record was made from, in a few words; None
    when it is, or when the record holds no identity to compare with."""
    # size first, then content. The mtime alone cannot decide: every copy changes it (cp without
    # -p, a job's stage-in to local disk), and refusing copies would force re-tiling whole cohorts.
    # Same size and mtime: the same file, nothing read. Same size, other mtime: one OpenSlide open
    # compares the dimensions and content hash
    try:
        info = os.stat(path)
    except OSError:
        return 'gone'
    if not stat.S_ISREG(info.st_mode):
        return 'not a regular file'
    identity = recorded_identity(record)
    if identity is None:
        return None
    if info.st_size != identity['bytes']:
        return f"{info.st_size:,} bytes, {identity['bytes']:,} when tiled"
    if info.st_mtime_ns == int(record['slide_mtime_ns']):
        return None
    try:
        slide = open_slide(path)
    except SlideError:
        return 'it no longer opens'
    try:
        dimensions = list(slide.dimensions)
        content = content_hash(slide, path, info.st_size)
    finally:
        slide.close()
    if dimensions != identity['dimensions']:
        width, height = identity['dimensions']
        return f'{dimensions[0]}x{dimensions[1]} px, {width}x{height} when tiled'
    if content != identity['hash']:
        return 'the same size, other content'
    return None


# ------------------------------------------------------------------ tissue detection and tile grid

def otsu(hist):
    """Otsu's threshold of a 256-bin histogram: the split that maximises the between-class
    variance; the class below it is the values <= the threshold."""
    hist = hist.astype(np.float64)
    # weight and first moment of the class below (0) and above (1) each candidate threshold
    w0, m0 = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    w1, m1 = w0[-1] - w0, m0[-1] - m0
    with np.errstate(divide='ignore', invalid='ignore'):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    return int(np.nanargmax(between)) if np.isfinite(between).any() else 255


def saturation_threshold(saturation, green):
    """The saturation above which a pixel is stained: Otsu's split of glass from tissue, or
    FIXED_SATURATION when there is no glass to split off. green: the thumbnail's green channel."""
    threshold = otsu(np.bincount(saturation.ravel(), minlength=256))
    below = saturation <= threshold
    # a slide that is all tissue (a crop, a resection filling the scan) has no glass mode: Otsu
    # splits eosin from haematoxylin and drops the eosin (measured: 0 of 144 tiles kept). When the
    # class below the split absorbs green as stain does, the fixed threshold takes over. Not the
    # classes' saturations: tinted glass under pale tissue is S 42 vs 59, eosin under nuclei 55 vs
    # 105, so a rule on saturation would make the whole of a tinted slide tissue
    if green[below].mean() <= GLASS_GREEN:
        return FIXED_SATURATION
    return max(threshold, OTSU_FLOOR)


def tissue_mask(rgb, seg_mpp):
    """Boolean tissue mask of an RGB thumbnail at seg_mpp µm/px."""
    hsv = np.asarray(Image.fromarray(rgb).convert('HSV'))
    # CLAM median-blurs the saturation channel before thresholding; a 3x3 box blur does the same
    # job at a fraction of the cost (PIL's median filter takes ~1 s on a 1 Mpx thumbnail), and
    # speck removal follows anyway
    saturation = np.asarray(Image.fromarray(hsv[..., 1]).filter(ImageFilter.BoxBlur(1)))
    red, green = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    value = hsv[..., 2]
    stained = saturation > saturation_threshold(saturation, rgb[..., 1])
    not_dark = value >= MIN_VALUE
    not_ink = green <= red + INK_MARGIN
    mask = stained & not_dark & not_ink
    px_mm2 = (seg_mpp / 1000) ** 2
    # drop specks: pieces smaller than MIN_PIECE_MM2
    pieces, n_pieces = ndimage.label(mask)
    piece_mm2 = np.bincount(pieces.ravel(), minlength=n_pieces + 1) * px_mm2
    mask = (piece_mm2 >= MIN_PIECE_MM2)[pieces] & mask
    # fill holes: background pieces that are small and do not touch the border
    holes, n_holes = ndimage.label(~mask)
    hole_mm2 = np.bincount(holes.ravel(), minlength=n_holes + 1) * px_mm2
    small = hole_mm2 < MAX_HOLE_MM2
    on_border = np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])
    small[np.unique(on_border)] = False
    # label 0 is the tissue itself
    small[0] = False
    return mask | small[holes]


def score_grid(mask, seg_ds, footprint, bounds):
    """Tissue fraction of every tile of the grid (rows × cols) at once, from an integral image."""
    # tile (r, c) covers level-0 [c·footprint, (c+1)·footprint) from the bounds' origin;
    # only whole tiles count
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    integral[1:, 1:] = mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    cols, rows = int(bounds[2] // footprint), int(bounds[3] // footprint)
    # tile edges in thumbnail px
    edges_x = np.rint(np.arange(cols + 1) * footprint / seg_ds)
    edges_y = np.rint(np.arange(rows + 1) * footprint / seg_ds)
    edges_x = np.clip(edges_x, 0, mask.shape[1]).astype(int)
    edges_y = np.clip(edges_y, 0, mask.shape[0]).astype(int)
    top, bottom = edges_y[:-1, None], edges_y[1:, None]
    left, right = edges_x[None, :-1], edges_x[None, 1:]
    # tissue pixels inside each tile: four corners of the integral image
    inside = (integral[bottom, right] - integral[top, right]
              - integral[bottom, left] + integral[top, left])
    return inside / np.maximum((bottom - top) * (right - left), 1)


def wrap_text(text, font, width):
    """The lines of text, each at most width px wide in font: broken between words, or inside a
    word wider than that (a long stem)."""
    lines = ['']
    for word in text.split():
        joined = f'{lines[-1]} {word}'.strip()
        if font.getlength(joined) <= width:
            lines[-1] = joined
            continue
        lines.append('')
        for letter in word:
            if lines[-1] and font.getlength(lines[-1] + letter) > width:
                lines.append('')
            lines[-1] += letter
    return [line for line in lines if line]


def draw_qc(rgb, mask, tiles_px, tile_px, caption):
    """QC picture: the thumbnail with the tissue outline in green and kept tiles in blue, and the
    caption below it on white, wrapped to the picture's width."""
    # a small slide's thumbnail is tens of px: enlarged by whole pixels, it still shows exactly the
    # pixels tissue was found on
    scale = max(1, math.ceil(QC_MIN_SIDE / max(mask.shape)))
    qc = rgb.repeat(scale, 0).repeat(scale, 1)
    mask = mask.repeat(scale, 0).repeat(scale, 1)
    qc[mask & ~ndimage.binary_erosion(mask)] = (0, 170, 0)
    font = ImageFont.load_default()
    lines = wrap_text(caption, font, qc.shape[1] - 8)
    line_px = font.getbbox('Hg')[3] + 2
    image = Image.new('RGB', (qc.shape[1], qc.shape[0] + len(lines) * line_px + 6), 'white')
    image.paste(Image.fromarray(qc))
    draw = ImageDraw.Draw(image)
    for x, y in tiles_px * scale:
        draw.rectangle((x, y, x + tile_px * scale, y + tile_px * scale), outline=(0, 60, 255))
    for i, line in enumerate(lines):
        draw.text((4, qc.shape[0] + 3 + i * line_px), line, fill=(0, 0, 0), font=font)
    return image


def save_atomic(path, write):
    """Write `path` through a temporary name, then rename it."""
    # a killed run never leaves a half file that looks done
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        # a failed write (a full disk, Ctrl-C) takes its temporary with it
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def segmentation_thumbnail(slide, slide_mpp, mpp, tile_size, bounds):
    """The scanned area as uint8 RGB, as coarse as still resolves a tile (SEG_TILE_PX px a side),
    and its level-0 px per pixel."""
    seg_mpp = min(SEG_MPP, tile_size * mpp / SEG_TILE_PX)
    downsamples = slide.level_downsamples
    # read the coarsest level that fine: reading a 40x Aperio slide's 4 µm/px level and halving it
    # takes 0.15 of 0.34 s a slide, its 16 µm/px level reads in ~8 ms. A level up to
    # MPP_SLACK coarser counts: a 40x scan at 0.2527 µm/px has its downsample-64 level at 16.2
    fine_enough = seg_mpp * (1 + MPP_SLACK)
    finer = [i for i, d in enumerate(downsamples) if slide_mpp * d <= fine_enough] or [0]
    seg_level = max(finer, key=lambda i: downsamples[i])
    # a slide without so coarse a level is box-shrunk to seg_mpp as it is read
    factor = max(1, int(fine_enough / (slide_mpp * downsamples[seg_level])))
    rgb = read_thumbnail(slide, seg_level, factor, bounds)
    return rgb, downsamples[seg_level] * factor


def check_readable(slide, coords, level, read_size):
    """Read a pixel at the centre of the first and last tile of a slide."""
    # an unreadable tile level fails here, not in the middle of training. One pixel decodes the
    # scanner's JPEG block under it: 0.2 ms, where a whole 512 px tile of a 40x level took 4-9 ms
    centre = read_size * slide.level_downsamples[level] / 2
    try:
        for x, y in coords[[0, -1]] if len(coords) else []:
            slide.read_region((int(x + centre), int(y + centre)), level, (1, 1))
    except openslide.OpenSlideError as e:
        raise SlideError(
            f'level {level} is unreadable (OpenSlideError: {e}): truncated or corrupt') from None


def find_tiles(slide, path, mpp, tile_size, min_tissue, mpp_table, default_mpp):
    """Where one slide's tiles are: level, read size, level-0 coords and what they were found on."""
    slide_mpp = find_mpp(slide, path, mpp_table, default_mpp)
    level, read_size = pick_level(slide, slide_mpp, mpp, tile_size)
    # level-0 px per tile side
    footprint = read_size * slide.level_downsamples[level]
    bounds = slide_bounds(slide)
    if min(bounds[2:]) < footprint:
        width_mm, height_mm = (side * slide_mpp / 1000 for side in bounds[2:])
        raise SlideError(
            f'smaller than one tile: {width_mm:.3g} x {height_mm:.3g} mm scanned, a tile is '
            f'{tile_size} px at {mpp} µm/px ({tile_size * mpp / 1000:.3g} mm a side); '
            'tile it with a smaller --tile or --mpp')
    # seg_ds: level-0 px per thumbnail px
    rgb, seg_ds = segmentation_thumbnail(slide, slide_mpp, mpp, tile_size, bounds)
    mask = tissue_mask(rgb, slide_mpp * seg_ds)
    tissue = score_grid(mask, seg_ds, footprint, bounds)
    rows, cols = np.nonzero(tissue >= min_tissue)
    # the grid starts at the level's origin and steps read_size of its pixels, so it lies on the
    # stored tiles of the level it reads, whichever level that is: a 512 px footprint covers
    # exactly 2 x 2 stored tiles of 256 px, a 256 px one exactly one, and none straddles more
    # stored tiles than its size must (read_stored_tiles reads only those)
    xs = bounds[0] + np.rint(cols * footprint)
    ys = bounds[1] + np.rint(rows * footprint)
    coords = np.stack([xs, ys], 1).astype(np.int64).reshape(-1, 2)
    check_readable(slide, coords, level, read_size)
    return dict(slide_mpp=slide_mpp, level=level, read_size=read_size, footprint=footprint,
                rgb=rgb, mask=mask, seg_ds=seg_ds, tissue=tissue, rows=rows, cols=cols,
                coords=coords, identity=slide_identity(slide, path))


def check_stem_is_free(out_dir, stem, path):
    """Refuse to overwrite <stem>.npz when it holds the tiles of another slide that still exists."""
    # the stems of one batch never clash, but two runs at once into one --out could compute one
    # stem for two slides; the second to write then fails instead of overwriting the first
    npz = os.path.join(out_dir, stem + '.npz')
    if not os.path.exists(npz):
        return
    # an unreadable .npz holds nobody's tiles
    try:
        owner = str(load_tiles(npz)['slide_path'])
    except SlideError:
        return
    if os.path.exists(owner) and not os.path.samefile(owner, path):
        raise SlideError(f'{stem}.npz in {out_dir} holds the tiles of {owner}, another slide '
                         '(two runs at once into one --out?); rerun, alone, to tile this one')


def write_tiles(out_dir, stem, path, tiles, mpp, tile_size, min_tissue):
    """<stem>.jpg (QC), then <stem>.npz: written last, the .npz marks the slide as done."""
    check_stem_is_free(out_dir, stem, path)
    level, read_size, coords = tiles['level'], tiles['read_size'], tiles['coords']
    caption = (f'{stem}: {len(coords)} tiles, {tile_size}px at {mpp} um/px, '
               f'level {level} read {read_size}px')
    rows, cols = tiles['rows'], tiles['cols']
    # the kept tiles' corners and side, in thumbnail px
    corners_px = np.stack([cols, rows], 1) * tiles['footprint'] / tiles['seg_ds']
    side_px = tiles['footprint'] / tiles['seg_ds']
    qc = draw_qc(tiles['rgb'], tiles['mask'], corners_px, side_px, caption)
    save_atomic(os.path.join(out_dir, stem + '.jpg'), lambda f: qc.save(f, 'JPEG', quality=85))
    tissue = tiles['tissue'][rows, cols].astype(np.float32)
    arrays = dict(coords=coords, tissue=tissue, level=level, read_size=read_size,
                  tile_size=tile_size, mpp=mpp, min_tissue=min_tissue,
                  slide_mpp=tiles['slide_mpp'], slide_path=os.path.abspath(path),
                  **tiles['identity'])
    save_atomic(os.path.join(out_dir, stem + '.npz'), lambda f: np.savez(f, **arrays))


def tile_slide(path, stem, out_dir, mpp=MPP, tile_size=TILE_SIZE, min_tissue=MIN_TISSUE,
               mpp_table=None, slide_mpp=None):
    """Tile one slide into out_dir/<stem>.jpg and <stem>.npz; returns its manifest row."""
    t0 = time.perf_counter()
    row = new_row(path, stem)
    # one bad slide must not stop the batch: record a one-line reason, never a traceback
    try:
        slide = open_slide(path)
        try:
            tiles = find_tiles(slide, path, mpp, tile_size, min_tissue, mpp_table, slide_mpp)
        finally:
            slide.close()
        write_tiles(out_dir, stem, path, tiles, mpp, tile_size, min_tissue)
        n_tiles = len(tiles['coords'])
        row.update(n_tiles=n_tiles, slide_mpp=tiles['slide_mpp'], level=tiles['level'],
                   read_size=tiles['read_size'])
        if n_tiles:
            row['status'] = 'ok'
        else:
            tissue_cover = tiles['mask'].mean()
            row['error'] = (f"no tissue: 0 of {tiles['tissue'].size} grid tiles are "
                            f">= {min_tissue:.0%} tissue (tissue covers {tissue_cover:.1%} "
                            f"of the thumbnail; see {stem}.jpg)")
    except Exception as e:
        reason = str(e) if isinstance(e, SlideError) else f'{type(e).__name__}: {e}'
        row['error'] = ' '.join(reason.split())
    row['seconds'] = round(time.perf_counter() - t0, 3)
    return row


# ------------------------------------------------------------------------------------------- batch

def find_slides(inputs, exclude=None):
    """Slide files named or found (recursively) under the inputs, sorted; and {path: reason} of
    the links that lead nowhere and the special files (FIFOs, devices) among them, never opened."""
    exclude = os.path.abspath(exclude) + os.sep if exclude else None
    found, skipped, dicom_dirs, walked = [], {}, set(), set()
    for item in inputs:
        # named explicitly: always tried, whatever its suffix
        named = not os.path.isdir(item)
        candidates = [item] if named else slide_candidates(item, exclude, dicom_dirs, walked)
        for path in candidates:
            reason = not_a_slide_file(path)
            if reason:
                skipped[path] = reason
            else:
                found.append(path)
    # a file named twice (by a relative and an absolute path) is one slide
    by_path = {os.path.abspath(p): p for p in found}
    return sorted(by_path.values()), skipped


def slide_candidates(folder, exclude, dicom_dirs, walked):
    """The files below folder that may be slides, by name: sorted, each folder walked once."""
    for p in sorted(walk_once(folder, walked)):
        root, ext = os.path.splitext(p)
        ext = ext.lower()
        # our own QC picture: beside its .npz, or anywhere in the output folder
        in_output = exclude and os.path.abspath(p).startswith(exclude)
        is_qc = ext in PLAIN_IMAGES and (os.path.exists(root + '.npz') or in_output)
        if ext not in SUFFIXES or os.path.basename(p).startswith('.') or is_qc:
            continue
        # a DICOM series is a folder of .dcm files that OpenSlide opens from any one of them,
        # so one file per folder is kept
        if ext == '.dcm':
            if os.path.dirname(p) in dicom_dirs:
                continue
            dicom_dirs.add(os.path.dirname(p))
        yield p


def walk_once(folder, walked):
    """Every path below folder that is not a folder, following links to folders but entering each
    real folder once (walked: the real paths entered so far)."""
    # a link to a parent (ln -s $PWD loop) would otherwise be walked until the path is too long,
    # and every slide found 40 times under other names
    for here, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in walked:
            folders.clear()
            continue
        walked.add(real)
        # the first path to a folder (in sorted order) is the one kept
        folders.sort()
        yield from (os.path.join(here, f) for f in files)


def not_a_slide_file(path):
    """Why path cannot be a slide file, without opening it: a link that leads nowhere, a special
    file (reading a FIFO waits for a writer forever); None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            return (f'a link to {os.readlink(path)}, which cannot be followed ({e.strerror}): '
                    'fix or remove the link')
        return f'cannot be read ({e.strerror})'
    if stat.S_ISREG(mode):
        return None
    kind = 'a device, socket or other special file'
    if stat.S_ISFIFO(mode):
        kind = 'a named pipe (FIFO)'
    return f'{kind}, not a slide file: skipped unopened; move it out of the slide folder'


def stem_choices(path):
    """The output stems a slide may take, most readable first."""
    # the file stem (TRIDENT's and CLAM's slide id); the file name when another slide has that stem
    # with another suffix (X.svs, X.tiff: a converted copy beside its original); stem + a hash of
    # the folder when that file name is in several folders (a/X.svs, b/X.svs); name + that hash
    # when both happen. The manifest maps each stem to its slide's path
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    folder = hashlib.sha1(os.path.dirname(path).encode()).hexdigest()[:8]
    return [stem, name, f'{stem}-{folder}', f'{name}-{folder}']


def first_distinct_choice(choices, rival_choices):
    """Index of the first of `choices` that no rival's choice of the same rank matches."""
    for rank, choice in enumerate(choices):
        if all(rival[rank].casefold() != choice.casefold() for rival in rival_choices):
            return rank
    return len(choices) - 1


def unique_stems(paths, earlier):
    """Output stem of each slide: the first of its stem_choices that sets it apart from every other
    slide of its stem; None where none does (names that differ only in case)."""
    # slides in `earlier` (tiled into --out before: path -> stem) keep their stem, and a new slide
    # never takes that of another existing slide: tiling folder A, then B, into one --out keeps
    # both (how users add a cohort). A stem whose slide is gone (moved), or is this very file by
    # another path, goes to the new slide. The stems depend on the set of paths, never on their
    # order, so every shard computes the same ones
    paths = [os.path.abspath(p) for p in paths]
    listed = set(paths)
    existing = {p: stem for p, stem in earlier.items() if p not in listed and os.path.exists(p)}
    choices = {p: stem_choices(p) for p in paths + list(existing)}
    # what a slide tiled earlier stands on is its stem itself: a new slide may take the plain stem
    # it left free, but never a choice that would not tell them apart (a/S.svs is S, b/S.svs is
    # S-<hash of b>, not S.svs)
    claims = {p: [earlier.get(p, c[0])] + c[1:] for p, c in choices.items()}
    # case-folded: X.npz and x.npz are one file on macOS and Windows disks
    by_stem = collections.defaultdict(list)
    for p in choices:
        by_stem[choices[p][0].casefold()].append(p)
    ranks = {}
    for p in paths:
        same_stem = by_stem[choices[p][0].casefold()]
        rivals = [claims[q] for q in same_stem if q != p and not os.path.samefile(q, p)]
        ranks[p] = first_distinct_choice(choices[p], rivals)
    # a choice of one rank can still equal another slide's of another rank (X.tiff's name is the
    # stem of X.tiff.svs): both then move on to their next choice
    owners = {stem.casefold(): p for p, stem in existing.items()}
    while True:
        stems = [earlier.get(p) or choices[p][ranks[p]] for p in paths]
        counts = collections.Counter(stem.casefold() for stem in stems)
        clashes = []
        for p, stem in zip(paths, stems):
            owner = owners.get(stem.casefold())
            taken = owner and not os.path.samefile(owner, p)
            if p not in earlier and (counts[stem.casefold()] > 1 or taken):
                clashes.append(p)
        movable = [p for p in clashes if ranks[p] + 1 < len(choices[p])]
        if not movable:
            return [None if p in set(clashes) else stem for p, stem in zip(paths, stems)]
        for p in movable:
            ranks[p] += 1


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def write_csv(path, columns, rows):
    """Rows (dicts) as a CSV with a header, atomically: quoted where a value needs it (a comma in a
    path), and never a short file that reads as fewer slides or images."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    save_atomic(path, lambda f: f.write(text.getvalue().encode()))


def write_manifest(path, rows):
    """Write the rows as a manifest CSV, atomically; sorts the rows by stem, in place."""
    rows.sort(key=lambda r: r['stem'])
    write_csv(path, COLUMNS, rows)


def manifest_rows(path):
    """The rows of the manifest at path; none when there is none, or (with a warning line) when
    it is unreadable: the .npz files are the record of what is done, the manifest its summary."""
    if not os.path.exists(path):
        return []
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        rows, problem = [], f'{type(e).__name__}: {e}'
    else:
        problem = 'not the columns of a manifest' if rows and set(COLUMNS) - set(rows[0]) else ''
    if problem:
        print(f'warning: {path} is unreadable ({problem}): written anew with this run\'s rows',
              file=sys.stderr)
        return []
    return rows


def merge_manifest(path, rows):
    """Merge rows into the manifest at path: each replaces the row of its stem (or, without a stem,
    of its path) there, and the rows of other slides stay: tiling folder A, then B, into one --out
    lists both."""
    stems = {r['stem'] for r in rows if r['stem']}
    paths = {r['path'] for r in rows}
    kept = [r for r in manifest_rows(path) if r['stem'] not in stems and r['path'] not in paths]
    write_manifest(path, kept + rows)


def write_manifests(out_dir, rows, shard):
    """This run's rows merged into manifest.csv; a shard's written to manifest-I-of-N.csv, and
    merged with the other shards' by the last of the N to finish."""
    index, count = parse_shard(shard)
    manifest = os.path.join(out_dir, 'manifest.csv')
    # one merge at a time: shards ending together would each drop the others' rows
    lock = os.path.join(out_dir, '.manifest.lock')
    try:
        with locked(lock, wait=True):
            if not shard:
                merge_manifest(manifest, rows)
                return
            write_manifest(os.path.join(out_dir, f'manifest-{index}-of-{count}.csv'), rows)
            parts = [os.path.join(out_dir, f'manifest-{i}-of-{count}.csv') for i in range(count)]
            if all(map(os.path.exists, parts)):
                merge_manifest(manifest, [row for part in parts for row in read_csv(part)])
    except OSError as e:
        raise SystemExit(f'error: cannot write the manifest in {out_dir} ({e.strerror}): free '
                         'space there and rerun; the slides tiled are kept, and the rerun finds '
                         'them done') from None


def rows_after_crash(running, pool_size, suspects):
    """Rows of the slides in flight when a worker process died: those that finished before the
    crash; the others join `suspects`, or, when one was alone in its pool, it is the culprit."""
    for future, (path, stem) in running.items():
        if future.exception() is None:
            yield future.result()
        elif pool_size > 1:
            suspects.append((path, stem))
        else:
            error = ('crashed the worker process (a segfault or abort in the slide reader, '
                     'or no memory)')
            yield new_row(path, stem) | dict(error=error)


def init_worker():
    """A worker process's initializer: it leaves Ctrl-C to tile.py, and on Linux the kernel kills
    it when tile.py dies."""
    # Ctrl-C reaches the whole process group: tile.py lets the slides in flight finish and writes
    # the manifest; a worker's KeyboardInterrupt would only print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a tile.py killed by SIGKILL (a scheduler's time limit, an OOM kill) otherwise leaves its
    # workers waiting on their task queue forever: measured, hours later, still there
    if sys.platform.startswith('linux'):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_slides(jobs, workers, kwargs):
    """Yield the manifest row of each (path, stem), tiling `workers` slides at a time."""
    # a slide that crashes its process (a segfault in libopenslide or libtiff, the kernel's OOM
    # killer) breaks the whole pool: the slides that were in flight are then retried one at a time
    # in a fresh pool, so only the culprit is marked
    queue, suspects = collections.deque(jobs), collections.deque()
    while queue or suspects:
        source, size = (suspects, 1) if suspects else (queue, workers)
        running = {}
        with ProcessPoolExecutor(size, initializer=init_worker) as pool:
            try:
                while source or running:
                    # never more in flight: on a crash, they are the suspects
                    while source and len(running) < size:
                        running[pool.submit(tile_slide, *source[0], **kwargs)] = source[0]
                        source.popleft()
                    for future in wait(running, return_when=FIRST_COMPLETED).done:
                        yield future.result()
                        del running[future]
            except BrokenProcessPool:
                yield from rows_after_crash(running, size, suspects)


def run_batch(todo, rows, workers, kwargs):
    """Tile the slides of todo, appending their rows to rows (which holds the batch's other rows);
    True when Ctrl-C stopped it, the slides not recorded then having rows that say so."""
    tiled_before = len(rows)
    slides = run_slides(todo, max(1, workers), kwargs)
    progress = tqdm(slides, total=len(todo) + len(rows), initial=len(rows), unit='slide')
    try:
        for row in progress:
            rows.append(row)
    except KeyboardInterrupt:
        # the pool lets its slides in flight finish (its workers ignore SIGINT), then stops
        slides.close()
        progress.close()
        recorded = {(r['path'], r['stem']) for r in rows[tiled_before:]}
        error = 'interrupted (Ctrl-C) before this slide was recorded: rerun to tile it'
        rows += [new_row(p, stem) | dict(error=error) for p, stem in todo
                 if (p, stem) not in recorded]
        return True
    return False


def finished_row(path, stem, record, settings):
    """The manifest row of a slide tiled into out_dir earlier (record: its .npz): an error when it
    was tiled with other settings (mpp, tile_size, min_tissue) or found no tissue."""
    done_settings = (float(record['mpp']), int(record['tile_size']),
                     float(record.get('min_tissue', settings[2])))
    row = dict(path=path, stem=stem, status='ok', n_tiles=len(record['coords']),
               slide_mpp=float(record['slide_mpp']), level=int(record['level']),
               read_size=int(record['read_size']), seconds=0, error='')
    # never mix two settings in one folder
    if done_settings != settings:
        done_mpp, done_tile_size, done_min_tissue = done_settings
        error = (f'done earlier at {done_mpp} µm/px, {done_tile_size} px, --min-tissue '
                 f'{done_min_tissue}; use another --out, or --overwrite')
        row.update(status='error', error=error)
    elif not row['n_tiles']:
        row.update(status='error', error='no tissue (done earlier)')
    return row


def needs_tiling(path, stem, records):
    """Whether a slide has no tiles in the folder yet, or tiles of another file than the one now
    at its path (said in a line: it is tiled again). records: {stem: .npz arrays} of the folder."""
    record = records.get(stem)
    if record is None or str(record['slide_path']) != os.path.abspath(path):
        return True
    why = slide_change(record, path)
    if why:
        print(f'{path} changed since it was tiled ({why}): tiling it again', file=sys.stderr)
    return why is not None


def plan_batch(inputs, out_dir, shard, overwrite, settings):
    """This shard's slides still to tile, as (path, stem), and the rows of the others: those done
    earlier, and those not tiled (no name of their own, a link to nowhere, a special file)."""
    paths, skipped = find_slides(inputs, exclude=out_dir)
    # slides tiled into out_dir before; an unreadable .npz is warned about and left to be redone
    records = readable_tiles(out_dir)
    # absolute path -> stem
    earlier = {str(record['slide_path']): stem for stem, record in records.items()}
    # stems from the full list, so every shard agrees on them
    jobs = list(zip(paths, unique_stems(paths, earlier)))
    index, count = shard
    jobs = jobs[index::count]
    # two slides never write one .npz: a slide left without a stem of its own is an error
    clashing = [path for path, stem in jobs if stem is None]
    jobs = [(path, stem) for path, stem in jobs if stem is not None]
    todo = [(p, stem) for p, stem in jobs if overwrite or needs_tiling(p, stem, records)]
    finished = sorted(set(jobs) - set(todo))
    rows = [finished_row(path, stem, records[stem], settings) for path, stem in finished]
    error = ('no output name of its own: another slide has the same name but for case '
             '(X.svs, x.svs: one file on macOS and Windows disks); rename one of them')
    rows += [new_row(path, '') | dict(error=error) for path in clashing]
    # each shard reports its share of the files that are not slides, as of the slides
    rows += [new_row(path, '') | dict(error=reason)
             for path, reason in sorted(skipped.items())[index::count]]
    return todo, rows


def parse_shard(shard):
    """(index, count) of --shard I/N, given as 'I/N' or (I, N); (0, 1) without one."""
    if not shard:
        return 0, 1
    return tuple(map(int, shard.split('/'))) if isinstance(shard, str) else tuple(shard)


def check_mpp(value, what):
    """value, a µm/px; SystemExit naming `what` when no scan or tile has it (MPP_RANGE)."""
    low, high = MPP_RANGE
    # NaN fails the comparison too
    if not low <= value <= high:
        raise SystemExit(f'error: {what}: {value:g} µm/px is outside {low}-{high:g}; a 40x scan '
                         'is about 0.25 µm/px, 20x 0.5')
    return value


def check_settings(mpp, tile_size, min_tissue, slide_mpp):
    """Stop with one line on a setting that no slide can be tiled with, before any work."""
    if not isinstance(tile_size, numbers.Integral) or tile_size < 1:
        raise SystemExit(f'error: --tile {tile_size}: a tile side is a whole number of px, at '
                         'least 1 (G2L: 256)')
    check_mpp(mpp, '--mpp')
    if slide_mpp is not None:
        check_mpp(slide_mpp, '--slide-mpp')
    if not 0 <= min_tissue <= 1:
        raise SystemExit(f'error: --min-tissue {min_tissue}: a fraction of a tile, 0 to 1 '
                         f'(default {MIN_TISSUE})')


def read_mpp_csv(path):
    """{slide: level-0 µm/px} from an --mpp-csv 'slide,mpp'; SystemExit, one line, on a header or
    value that is not one."""
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f'error: --mpp-csv {path} cannot be read ({type(e).__name__}: {e})')
    if rows and {'slide', 'mpp'} - set(rows[0]):
        header = ','.join(k for k in rows[0] if k is not None)
        raise SystemExit(f"error: --mpp-csv {path} has the header '{header}': it needs "
                         "'slide,mpp', then a line per slide such as 'TCGA-01.svs,0.25'")
    table = {}
    # line 1 is the header
    for line, row in enumerate(rows, 2):
        try:
            value = float(row['mpp'])
        except (TypeError, ValueError):
            raise SystemExit(f"error: --mpp-csv {path} line {line}: mpp {row['mpp']!r} is not "
                             'a number of µm/px') from None
        table[(row['slide'] or '').strip()] = check_mpp(value, f'--mpp-csv {path} line {line}')
    return table


def tile_slides(inputs, out_dir, mpp=MPP, tile_size=TILE_SIZE, min_tissue=MIN_TISSUE, workers=1,
                shard=None, overwrite=False, slide_mpp=None, mpp_csv=None):
    """Tile every slide under `inputs` into out_dir in max(1, workers) processes; returns this
    batch's manifest rows, merged into manifest.csv too. Ctrl-C lets the slides in flight finish,
    writes the manifest, then raises KeyboardInterrupt."""
    # a temporary last written before now is no live run's (remove_stale_temporaries)
    started = time.time()
    out_dir = str(out_dir)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    # every argument is checked before anything is written
    check_settings(mpp, tile_size, min_tissue, slide_mpp)
    mpp_table = read_mpp_csv(mpp_csv) if mpp_csv else None
    make_out_folder(out_dir)
    index, count = parse_shard(shard)
    # shards of one job write one folder together, each its own slides
    parts = [f'shard-{index}-of-{count}'] if shard else []
    with one_writer(out_dir, 'tile', parts):
        remove_stale_temporaries(out_dir, started)
        settings = (mpp, tile_size, min_tissue)
        inputs = [str(p) for p in inputs]
        todo, rows = plan_batch(inputs, out_dir, (index, count), overwrite, settings)
        kwargs = dict(out_dir=out_dir, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue,
                      slide_mpp=slide_mpp, mpp_table=mpp_table)
        interrupted = run_batch(todo, rows, workers, kwargs)
        write_manifests(out_dir, rows, shard)
    if interrupted:
        raise KeyboardInterrupt
    return rows


# ------------------------------------------------------------ output folders: one writer at a time

def make_out_folder(folder, flag='--out'):
    """Make an output folder if missing; SystemExit, one line, when it cannot be one."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f'error: {flag} {folder} is a file, not a folder: give a folder (it is '
                         'made when missing)')
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SystemExit(f'error: cannot make {flag} {folder} ({e.strerror}): give a folder '
                         'that can be written') from None


@contextlib.contextmanager
def one_writer(folder, program, parts=(), flag='--out'):
    """Hold the writers' lock of an output folder while the block runs: alone, or with parts
    (shard 3 of 8, one model's files) beside other runs that have parts, each part once. Another
    live run in the way is SystemExit, one line that names the program's flag for the folder; a
    dead run's lock is none (see locked)."""
    lock = os.path.join(folder, f'.{program}.lock')
    with contextlib.ExitStack() as held:
        busy = f'another {program}.py run is writing into {folder}'
        held.enter_context(locked(lock, busy, shared=bool(parts), flag=flag))
        for part in parts:
            lock = os.path.join(folder, f'.{program}-{part}.lock')
            busy = f'another {program}.py run is writing {part} into {folder}'
            held.enter_context(locked(lock, busy, flag=flag))
        yield


@contextlib.contextmanager
def locked(path, busy='', shared=False, wait=False, flag='--out'):
    """Hold an flock on path while the block runs, shared with other shared holders or alone.
    Without wait, another holder is SystemExit: 'error: <busy> (<holder>): ... another <flag>'."""
    # flock, not a pid in a file: the kernel drops a process's locks when it dies, however it dies
    # (SIGKILL, OOM), so a dead run's lock file is simply taken over; and NFSv4 carries it between
    # machines
    fd = acquire(path, busy, shared, wait, flag)
    try:
        yield
    finally:
        release(path, fd)


def acquire(path, busy, shared, wait, flag):
    """An open descriptor of the lock file at path, holding its flock."""
    how = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f'error: cannot write into {os.path.dirname(path)} ({e.strerror}): '
                             'give a folder that can be written') from None
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors='replace').strip() or 'pid unknown'
            os.close(fd)
            raise SystemExit(f'error: {busy} ({holder}): wait for it to end, or give another '
                             f'{flag}') from None
        except OSError as e:
            # a filesystem without locks (Lustre mounted without flock): warned, not refused
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f'warning: cannot lock {path} ({e.strerror}): make sure no other run writes '
                  'there', file=sys.stderr)
            return fd
        # a lock taken on a file its last holder removed on leaving (release) locks nothing
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                write_holder(fd)
                return fd
        os.close(fd)


def write_holder(fd):
    """Say in the lock file who holds it, for the line of a run that finds it held."""
    holder = f'pid {os.getpid()} on {socket.gethostname()}'
    # a full disk leaves the file empty: the lock holds all the same
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)


def release(path, fd):
    """Drop the lock at path; its last holder removes the file, so a finished run leaves none."""
    # exclusive only when nobody else holds it: a shard still at work keeps the file
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    os.close(fd)


def remove_stale_temporaries(folder, started):
    """Delete the temporaries that runs killed mid-write left in folder: those whose process is
    gone and that were last written before this run `started`."""
    # never a live run's: a run on this machine has a live pid; one on another machine that shares
    # the folder has a pid that means nothing here, but it writes a file in seconds
    names = os.listdir(folder) if os.path.isdir(folder) else []
    removed = 0
    for name in names:
        pid = temporary_pid(name)
        if pid is None or process_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            if os.stat(path).st_mtime >= started:
                continue
            os.remove(path)
        except FileNotFoundError:
            # another run removed it first
            continue
        removed += 1
    if removed:
        print(f'removed {removed} temporary files of killed runs from {folder}')


def temporary_pid(name):
    """The pid in the name of a temporary file (TEMPORARY_NAMES); None for any other file."""
    for pattern in TEMPORARY_NAMES:
        match = pattern.fullmatch(name)
        if match:
            return int(match[1])
    return None


def process_alive(pid):
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        # another user's process
        return True
    return True


# ----------------------------------------------------------------------------------- reading tiles

def to_tile(region, tile_size):
    """A region read from a slide as uint8 (3, tile_size, tile_size): an RGBA image from OpenSlide,
    or RGB pixels from the stored JPEG tiles; read_size px, or tile_size when shrunk in the DCT."""
    size = region.size[0] if isinstance(region, Image.Image) else len(region)
    # no level at the target mpp: shrink from the finer one by area averaging
    if size != tile_size:
        # drop alpha first: Pillow premultiplies RGBA around every resample
        is_image = isinstance(region, Image.Image)
        region = region.convert('RGB') if is_image else Image.fromarray(region)
        if size % tile_size == 0:
            region = region.reduce(size // tile_size)
        else:
            region = region.resize((tile_size,) * 2, Image.BOX)
    # RGBA -> RGB and HWC -> CHW in one numpy copy
    # (PIL convert + a torch permute copy cost ~4x more here)
    return np.ascontiguousarray(np.asarray(region)[..., :3].transpose(2, 0, 1))


class TileDataset:
    """A tiles folder as a map-style dataset: ds[i] is tile i, uint8 (3, tile_size, tile_size)."""

    # read Aperio SVS and generic tiled TIFFs straight from their stored JPEG tiles where the
    # slide allows it (direct_layout); False: every tile through OpenSlide
    direct = True

    def __init__(self, tiles_dir):
        is_folder = os.path.isdir(tiles_dir)
        # an unreadable .npz is skipped with a warning line; tile.py tiles its slide again
        records = readable_tiles(tiles_dir) if is_folder else {}
        if not records:
            why = 'not a folder'
            if is_folder:
                why = 'no readable .npz' if npz_files(tiles_dir) else 'no .npz'
            raise ValueError(f"no tiles in {tiles_dir} ({why}): "
                             f"run `python tile.py SLIDES --out {tiles_dir}` first")
        npz = list(records.values())
        self.stems = list(records)
        self.slide_paths = [str(z['slide_path']) for z in npz]
        self.levels = [int(z['level']) for z in npz]
        self.read_sizes = [int(z['read_size']) for z in npz]
        # the um/px each slide was tiled at
        self.mpps = [float(z['mpp']) for z in npz]
        tile_sizes = {int(z['tile_size']) for z in npz}
        if len(tile_sizes) != 1:
            raise ValueError(f'{tiles_dir} mixes tile sizes {sorted(tile_sizes)}; '
                             'tile each size into its own folder')
        # a slide moved since it was tiled: its tiles would all be unreadable
        if gone := [p for p in self.slide_paths if not os.path.exists(p)]:
            raise ValueError(f'{len(gone)} slides tiled into {tiles_dir} are gone from where they '
                             f'were (e.g. {gone[0]}): tile them again from where they are now '
                             f'into {tiles_dir}, or delete their .npz')
        # a slide replaced since it was tiled would be read silently wrong: reads past the edge of
        # a smaller scan come back blank
        changes = [(p, slide_change(z, p)) for p, z in zip(self.slide_paths, npz)]
        if changed := [(p, why) for p, why in changes if why]:
            path, why = changed[0]
            raise ValueError(f'{len(changed)} slides tiled into {tiles_dir} changed since they '
                             f'were tiled (e.g. {path}: {why}): tile them again; `python tile.py '
                             f'SLIDES --out {tiles_dir}` redoes the changed ones')
        # what identifies each slide file but its mtime, which a copy changes: for the keys of
        # what is computed from these tiles (distill.py's teacher cache)
        self.slide_identities = [recorded_identity(z) for z in npz]
        self.tile_size = tile_sizes.pop()
        coords = [z['coords'] for z in npz]
        self.coords = np.concatenate(coords).reshape(-1, 2)
        # the slide of each tile, an index into stems, slide_paths, levels and read_sizes
        self.slide_index = np.repeat(np.arange(len(npz)), [len(c) for c in coords])
        # bad_reads: tiles found unreadable in this process; replaced: reads that returned another
        # tile in their place, counted every time (a known bad tile is replaced without a read)
        self._pid, self.bad_reads, self.replaced = None, 0, 0

    def __len__(self):
        return len(self.coords)

    # each process opens its own handles (OpenSlide's, open files) and decides for itself how each
    # slide is read: never one shared across DataLoader workers (dropped when pickled, or forked)
    def __getstate__(self):
        reset = dict(_pid=None, _handles=None, _cache=None, _layouts=None, bad_reads=0,
                     replaced=0)
        return {**self.__dict__, **reset}

    def _layout(self, s):
        """How slide s is read straight from its JPEG tiles (direct_layout), or None: through
        OpenSlide. Decided on the slide's first read in a process, kept for the others."""
        self._start_process()
        if s not in self._layouts:
            direct = self.direct and direct_layout(self.slide_paths[s], self.levels[s])
            self._layouts[s] = direct or None
        return self._layouts[s]

    def _handle(self, s):
        """Slide s's handle: an open file when it is read straight from its JPEG tiles, else
        OpenSlide's. At most MAX_OPEN_SLIDES stay open; the OpenSlide ones share one cache."""
        if s not in self._handles:
            if self._layout(s):
                self._handles[s] = open(self.slide_paths[s], 'rb', buffering=0)
            else:
                self._handles[s] = open_slide(self.slide_paths[s])
                self._handles[s].set_cache(self._cache)
        # the least recently used handle is first, and closed first
        self._handles.move_to_end(s)
        if len(self._handles) > MAX_OPEN_SLIDES:
            self._handles.popitem(last=False)[1].close()
        return self._handles[s]

    def _read_region(self, j):
        """Tile j's region as read (read_size px, or tile_size when shrunk in the DCT), or None
        when it is unreadable."""
        s, (x, y) = self.slide_index[j], self.coords[j]
        location, level, size = (int(x), int(y)), self.levels[s], self.read_sizes[s]
        try:
            if not self._layout(s):
                return self._handle(s).read_region(location, level, (size, size))
            try:
                return read_stored_tiles(self._handle(s), self._layout(s), location, size,
                                         self.tile_size)
            except ValueError:
                # a stored tile the decoder refuses (corrupt bytes): OpenSlide reads it or says why
                with contextlib.closing(open_slide(self.slide_paths[s])) as slide:
                    return slide.read_region(location, level, (size, size))
        except (openslide.OpenSlideError, SlideError, OSError) as e:
            # an OpenSlide handle that failed once fails every read after: reopen
            if s in self._handles:
                self._handles.pop(s).close()
            self._bad.add(j)
            self.bad_reads += 1
            print(f'warning: tile ({x}, {y}) at level {level} of {self.slide_paths[s]} '
                  f'is unreadable ({type(e).__name__}: {e}); another tile is read in its place',
                  file=sys.stderr)
            return None

    def _start_process(self):
        """On the first read in a process, its own handles: never use what a fork inherited."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._handles = collections.OrderedDict()
            # slide index -> its direct_layout or None, ~1 KB a slide whatever its size
            self._layouts = {}
            # tiles found unreadable in this process, never tried again
            self._bad = set()
            self.bad_reads = 0
            self.replaced = 0
            self._cache = openslide.OpenSlideCache(SLIDE_CACHE_MB << 20)

    def read(self, i):
        """Tile i, uint8 (3, tile_size, tile_size)."""
        self._start_process()
        # an unreadable tile (corrupt JPEG data, a file gone bad) is replaced by one drawn with seed
        # i, warned once, counted in ds.bad_reads: training goes on, and a resume gets past it. A
        # hundred bad tiles in a row: the data is broken, not a tile
        for attempt in range(100):
            j = int(np.random.default_rng([i, attempt]).integers(len(self))) if attempt else i
            if j in self._bad:
                continue
            region = self._read_region(j)
            if region is not None:
                # counted on every read, not once per bad tile: evaluate.py refuses a slide's
                # features when any of its tiles came back as another
                self.replaced += j != i
                return to_tile(region, self.tile_size)
        raise RuntimeError(f'tile {i} and the 99 tiles tried in its place are unreadable; '
                           'see the warnings above')

    def __getitem__(self, i):
        # only readers of tiles need torch; tiling never imports it
        import torch
        return torch.from_numpy(self.read(i))


# ----------------------------------------------- reading a TIFF's stored JPEG tiles, not OpenSlide
#
# OpenSlide decodes each JPEG tile under a region into its cache, paints it into a cairo surface and
# converts that to RGBA; TileDataset reads the same tiles' bytes and decodes them with
# libjpeg-turbo, shrunk in the DCT when it can (DCT_SHRINK): 4-7x the tiles/s (README). OpenSlide
# still tells which page is which level, and reads every other slide, level and tile.

def direct_layout(path, level):
    """What reading `level` of a slide straight from its stored JPEG tiles needs (see
    level_layout), or None where OpenSlide must read it."""
    # any file this cannot parse (another format or vendor, other compression, damaged tags, a
    # tile that decodes otherwise than in OpenSlide) is read through OpenSlide, as before
    try:
        if openslide.OpenSlide.detect_format(path) not in DIRECT_VENDORS:
            return None
        with (tifffile.TiffFile(path) as tif,
              contextlib.closing(openslide.OpenSlide(path)) as slide,
              open(path, 'rb', buffering=0) as file):
            layout = level_layout(tif, slide, level)
            return layout if layout and decodes_as_openslide(file, layout, slide, level) else None
    except Exception:
        return None


def level_layout(tif, slide, level):
    """The TIFF page of an OpenSlide level as a grid of plain JPEG tiles: the level's size and
    downsample, its tile size, where its TileOffsets and TileByteCounts are in the file, and the
    header every tile is decoded behind; None when it is not one."""
    (width, height), downsample = slide.level_dimensions[level], slide.level_downsamples[level]
    size = (width, height)
    pages = [p for p in tif.pages if p.is_tiled and (p.imagewidth, p.imagelength) == size]
    # a level OpenSlide scales by a fractional downsample is no whole pixels of the level
    if len(pages) != 1 or downsample != round(downsample):
        return None
    page = pages[0]
    # 8-bit RGB or YCbCr JPEG, interleaved: what libjpeg-turbo decodes to RGB
    plain_rgb = (page.planarconfig == 1 and page.bitspersample == 8
                 and page.samplesperpixel == 3 and page.imagedepth == 1)
    offsets, counts = page.tags['TileOffsets'], page.tags['TileByteCounts']
    # TIFF SHORT, LONG, LONG8 (TIFF 6.0 section 2, BigTIFF)
    entry_codes = {3: 'u2', 4: 'u4', 16: 'u8'}
    if not (page.compression == 7 and page.photometric in ADOBE_MARKER and plain_rgb
            and offsets.dtype in entry_codes and counts.dtype in entry_codes):
        return None
    # the JPEGTables every tile shares (an abbreviated stream, as Aperio's); none: whole streams
    tables = page.jpegtables or b'\xff\xd8\xff\xd9'
    header = b'\xff\xd8' + ADOBE_MARKER[page.photometric] + tables[2:-2]
    return dict(width=width, height=height, downsample=round(downsample),
                tile_width=page.tilewidth, tile_height=page.tilelength,
                across=-(-width // page.tilewidth), header=header,
                offsets=(offsets.valueoffset, tif.byteorder + entry_codes[offsets.dtype]),
                counts=(counts.valueoffset, tif.byteorder + entry_codes[counts.dtype]))


def decodes_as_openslide(file, layout, slide, level):
    """Whether the level's middle stored tile, decoded here, has OpenSlide's pixels exactly."""
    side = min(layout['tile_width'], layout['tile_height'])
    col, row = layout['across'] // 2, layout['height'] // layout['tile_height'] // 2
    location = (col * layout['tile_width'] * layout['downsample'],
                row * layout['tile_height'] * layout['downsample'])
    pixels = read_stored_tiles(file, layout, location, side, side)
    expected = np.asarray(slide.read_region(location, level, (side, side)))[..., :3]
    return np.array_equal(pixels, expected)


def read_stored_tiles(file, layout, location, size, tile_size):
    """The size px square at level-0 `location` of a layout's level, from the stored JPEG tiles
    under it (file: the slide, opened unbuffered), as uint8 RGB, size px a side or shrunk in the
    DCT (dct_scale). Raises ValueError where a stored tile does not decode, or the square is not
    whole pixels inside the level."""
    downsample = layout['downsample']
    left, top = location[0] // downsample, location[1] // downsample
    inside = left + size <= layout['width'] and top + size <= layout['height']
    if location[0] % downsample or location[1] % downsample or not inside:
        raise ValueError(f'{size} px at {location} are not whole pixels inside the level')
    tile_width, tile_height = layout['tile_width'], layout['tile_height']
    scale = dct_scale(layout, left, top, size, tile_size)
    region = np.empty((size // scale, size // scale, 3), np.uint8)
    file_size = os.fstat(file.fileno()).st_size
    first, last = left // tile_width, (left + size - 1) // tile_width
    for row in range(top // tile_height, (top + size - 1) // tile_height + 1):
        # a row's tiles are consecutive in TileOffsets and TileByteCounts
        k = row * layout['across'] + first
        offsets = tile_entries(file, layout['offsets'], k, last - first + 1)
        counts = tile_entries(file, layout['counts'], k, last - first + 1)
        rows = overlap(top, size, row * tile_height, tile_height, scale)
        for col, offset, count in zip(range(first, last + 1), offsets, counts):
            if offset + count > file_size:
                raise ValueError(f'stored tile ({col}, {row}) ends past the end of the file')
            stored = decode_tile(layout, os.pread(file.fileno(), count, offset), scale)
            cols = overlap(left, size, col * tile_width, tile_width, scale)
            region[rows[0], cols[0]] = stored[rows[1], cols[1]]
    return region


def dct_scale(layout, left, top, size, tile_size):
    """The shrink libjpeg-turbo does while decoding the square at level px (left, top): size /
    tile_size where DCT_SHRINK, that is 2, 4 or 8 and divides the square's corner and the stored
    tiles' sides, else 1 (decoded whole, shrunk by to_tile)."""
    scale = size // tile_size
    whole = [left, top, layout['tile_width'], layout['tile_height']]
    if DCT_SHRINK and size == scale * tile_size and scale in (2, 4, 8):
        if all(n % scale == 0 for n in whole):
            return scale
    return 1


def tile_entries(file, where, first, count):
    """`count` entries from entry `first` of a TIFF tile array: where = (file position, dtype)."""
    position, dtype = where
    itemsize = np.dtype(dtype).itemsize
    data = os.pread(file.fileno(), count * itemsize, position + first * itemsize)
    if len(data) != count * itemsize:
        raise ValueError(f'the TIFF ends inside its tile offsets (entry {first})')
    return np.frombuffer(data, dtype).tolist()


def overlap(start, size, tile_start, tile_size, scale):
    """Along one axis: where the part of a stored tile (from tile_start) that lies in the square
    (from start) goes in the square, and where it is in the tile, in px decoded at 1/scale."""
    low, high = max(start, tile_start), min(start + size, tile_start + tile_size)
    return (slice((low - start) // scale, (high - start) // scale),
            slice((low - tile_start) // scale, (high - tile_start) // scale))


def decode_tile(layout, stored, scale):
    """A stored JPEG tile's pixels, uint8 (tile_height / scale, tile_width / scale, 3)."""
    height, width = layout['tile_height'] // scale, layout['tile_width'] // scale
    # the tile's stream behind the level's header (its colour space, its tables). simplejpeg is
    # strict, as OpenSlide is: a corrupt stream raises ValueError, never decodes to grey blocks
    pixels = simplejpeg.decode_jpeg(layout['header'] + stored[2:], min_height=height,
                                    min_width=width)
    if pixels.shape != (height, width, 3):
        raise ValueError(f'a stored tile decoded to {pixels.shape[:2]}, not {(height, width)}')
    return pixels


def tiles_per_second(read, order):
    """How fast read(i) goes through the tiles in `order`."""
    t0 = time.perf_counter()
    for i in order:
        read(i)
    return len(order) / (time.perf_counter() - t0)


def read_bare(ds, handles, i):
    """Tile i of TileDataset ds as a loop without it reads: one read_region on open handles
    {slide index: OpenSlide}, then to_tile; no reopening, no replacing."""
    s = ds.slide_index[i]
    location = tuple(map(int, ds.coords[i]))
    region = handles[s].read_region(location, ds.levels[s], (ds.read_sizes[s],) * 2)
    return to_tile(region, ds.tile_size)


def cucim_reader(ds, slides):
    """read(i) of ds's tiles through cuCIM's CPU reader and to_tile, or None without cuCIM."""
    # cuCIM (cucim-cu12 or -cu13 on PyPI) is only timed, never needed
    try:
        from cucim import CuImage
        images = {s: CuImage(ds.slide_paths[s]) for s in slides}
    except Exception as e:
        print(f'cuCIM not timed ({type(e).__name__}: {e})')
        return None

    def read(i):
        s = ds.slide_index[i]
        size = (ds.read_sizes[s],) * 2
        location = tuple(map(int, ds.coords[i]))
        region = images[s].read_region(location=location, size=size, level=ds.levels[s])
        return to_tile(np.asarray(region), ds.tile_size)
    return read


def bench(tiles_dir, n=500):
    """Tiles/s on one core, on the same tiles in one run: a bare OpenSlide loop (read_region,
    to_tile), TileDataset through OpenSlide, TileDataset as it reads (straight from the JPEG tiles
    where it can), and cuCIM when it is installed."""
    import torch
    torch.set_num_threads(1)
    ds = TileDataset(tiles_dir)
    through_openslide = TileDataset(tiles_dir)
    through_openslide.direct = False
    # random order, as a training loader reads
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    # the bare loop keeps all its slides open
    slides = set(ds.slide_index[order].tolist())
    handles = {s: open_slide(ds.slide_paths[s]) for s in slides}
    readers = {'bare': functools.partial(read_bare, ds, handles),
               'openslide': through_openslide.__getitem__, 'direct': ds.__getitem__}
    if cucim := cucim_reader(ds, slides):
        readers['cucim'] = cucim
    rates = dict.fromkeys(readers, 0)
    # interleaved rounds, best of each: the first warms up, and a busy CPU hurts all alike
    for _ in range(3):
        for name, read in readers.items():
            rates[name] = max(rates[name], tiles_per_second(read, order))
    shrunk = np.mean([ds.read_sizes[s] != ds.tile_size for s in ds.slide_index[order]])
    direct = sum(ds._layout(s) is not None for s in slides)
    print(f'{len(order)} tiles of {len(ds)} from {len(slides)} slides ({shrunk:.0%} shrunk from '
          f'a finer level; {direct} of the slides read straight from their JPEG tiles)')
    names = dict(bare='bare OpenSlide read_region + to_tile', openslide='TileDataset, OpenSlide',
                 direct='TileDataset', cucim='cuCIM read_region + to_tile')
    for name, rate in rates.items():
        print(f'{names[name]:>38}: {rate:5.0f} tiles/s/core  {rate / rates["bare"]:4.2f}x bare')
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='*', help='slide files or folders (searched recursively)')
    parser.add_argument('--out', help='output folder for <stem>.npz, <stem>.jpg and manifest.csv')
    parser.add_argument('--mpp', type=float, default=MPP,
                        help='target µm/px of a tile (0.5 ~ 20x, 0.25 ~ 40x)')
    parser.add_argument('--tile', type=int, default=TILE_SIZE, help='tile side in px at --mpp')
    parser.add_argument('--min-tissue', type=float, default=MIN_TISSUE,
                        help='keep tiles at least this much tissue')
    parser.add_argument('--workers', type=int, default=1,
                        help='slides tiled in parallel (worker processes)')
    parser.add_argument('--shard',
                        help='I/N: slides I, I+N... (0-based) of the sorted list; '
                             'the last merges manifests')
    parser.add_argument('--overwrite', action='store_true',
                        help='redo slides that already have a <stem>.npz')
    parser.add_argument('--slide-mpp', type=float,
                        help='level-0 µm/px for slides whose metadata has none')
    parser.add_argument('--mpp-csv',
                        help="CSV 'slide,mpp' (slide = path, file name or stem); "
                             "wins over metadata")
    parser.add_argument('--bench', metavar='TILES_DIR',
                        help='time TileDataset, through OpenSlide or not, against bare '
                             'read_region (and cuCIM if installed) on a tiles folder')
    parser.add_argument('--demo', metavar='DIR',
                        help='write synthetic slides into DIR, tile and bench them')
    args = parser.parse_args(argv)
    if args.bench:
        bench(args.bench)
        return 0
    if args.demo:
        from demo import material
        material.tile_demo(args.demo)
        return 0
    named = args.inputs + ([args.mpp_csv] if args.mpp_csv else [])
    missing = [p for p in named if not os.path.exists(p)]
    if missing:
        parser.error(f'no such file or folder: {", ".join(missing)}')
    if not args.inputs or not args.out:
        parser.error('give SLIDE_OR_DIR ... --out DIR')
    index, _, count = (args.shard or '0/1').partition('/')
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        parser.error(f'--shard {args.shard}: expected I/N with 0 <= I < N, e.g. --shard 0/8')
    try:
        rows = tile_slides(args.inputs, args.out, args.mpp, args.tile, args.min_tissue,
                           args.workers, args.shard, args.overwrite, args.slide_mpp, args.mpp_csv)
    except KeyboardInterrupt:
        print(f'interrupted: the slides tiled so far are kept in {args.out} and listed in its '
              'manifest; rerun the same command to tile the rest', file=sys.stderr)
        # 128 + SIGINT, as a shell reports a run stopped by Ctrl-C
        return 130
    failed = [r for r in rows if r['status'] != 'ok']
    for r in failed:
        print(f"error {r['path']}: {r['error']}", file=sys.stderr)
    n_tiles = sum(r['n_tiles'] for r in rows)
    print(f"{len(rows)} slides: {len(rows) - len(failed)} ok, {len(failed)} failed, "
          f"{n_tiles} tiles -> {args.out}")
    return 1 if failed or not rows else 0


if __name__ == '__main__':
    sys.exit(main())
