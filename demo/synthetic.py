"""
Synthetic H&E material for the demo and the tests: pyramidal slides that OpenSlide opens, with
tissue blobs, nuclei, stains of two centres and a pen stroke; labelled crops and patch sets of
the same tissues; and small colour-coded patches for evaluate.py's tests.

Nothing here is part of G2L: it stands in for slides and labelled patches the demo cannot
download. tile.py, distill.py and evaluate.py never import it, except where the demo asks for it
(`python tile.py --demo DIR`, config/demo.py).
"""
import functools
import itertools
import math
import os

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageDraw

from tile import write_csv

# the splits of a labelled patch set, as evaluate.py reads them
SPLITS = ('train', 'val', 'test')


def pack_rgbx(rgb):
    """Float RGB (h, w, 3) as uint32 (h, w): each pixel's RGBX bytes in one number."""
    rgbx = np.pad(np.clip(rgb, 0, 255).astype(np.uint8), ((0, 0), (0, 0), (0, 1)))
    return rgbx.view(np.uint32)[..., 0]


# the default glass and one tinted glass (a test's): each pyramid is 14.5 MiB
@functools.lru_cache(maxsize=2)
def _stain_textures(glass_rgb, size=1024):
    """A seamless 256 µm square of H&E at 0.25 µm/px and one of bare glass of colour glass_rgb,
    each with box-averaged copies at every power-of-two coarser pixel size: [(stain, glass), ...],
    finest first."""
    # pink eosin, purple nuclei 5-9 µm wide, stain noise;
    # the same for every slide: seeds vary the tissue layout
    rng = np.random.default_rng(0)
    image = Image.new('RGB', (size, size), (232, 150, 196))
    draw = ImageDraw.Draw(image)
    centres = rng.uniform(0, size, (2, 220))
    radii = rng.uniform(10, 18, 220)
    for x, y, r in zip(*centres, radii):
        # drawn 9 times, a period apart: seamless when repeated
        for dx, dy in itertools.product((-size, 0, size), repeat=2):
            cx, cy = x + dx, y + dy
            draw.ellipse((cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r), fill=(92, 52, 142))
    tissue = np.asarray(image, np.float32) + rng.normal(0, 8, (size, size, 3)).astype(np.float32)
    glass = np.float32(glass_rgb) + rng.normal(0, 2, (size, size, 3)).astype(np.float32)
    # packed as RGBX in uint32: one np.where per tile instead of three
    pairs = zip(box_pyramid(tissue), box_pyramid(glass))
    return [[pack_rgbx(stain), pack_rgbx(bare)] for stain, bare in pairs]


# The demo's tissue classes differ in the shape, size and arrangement of their nuclei, not in
# colour: nuclei cover 18-30% of every class, so a tile's mean colour says nothing of its class and
# an encoder must see morphology to tell them apart (a random encoder barely can). Sizes follow
# textbook H&E histology: lymphocytes have small round nuclei (~5 µm across), carcinoma cells
# large pleomorphic ones (10-16 µm), the fibroblasts of stroma spindles 16-24 µm long and 2-3 µm
# wide. Necrosis is the odd one out, for the tests' slide-level signal: the debris of dead nuclei
# (karyorrhexis, 1.5-3 µm fragments) over a few per cent of pink cytoplasm, so it differs in
# colour too and even a random encoder sees it.
# name: (long semi-axis range in µm, short/long axis ratio range, spread of the orientation in
# radians: None for any, a number for spindles that run roughly parallel, as fibres do; range of
# the fraction of the area drawn as nuclei, drawn per texture)
TISSUES = {
    'tumour': ((5.0, 8.0), (0.6, 1.0), None, (0.18, 0.30)),
    'lymphocytes': ((2.0, 3.0), (0.85, 1.0), None, (0.18, 0.30)),
    'stroma': ((8.0, 12.0), (0.1, 0.15), 0.25, (0.18, 0.30)),
    'necrosis': ((0.75, 1.5), (0.5, 1.0), None, (0.03, 0.06)),
}
# the demo's classes: the tissues of equal nuclear cover, told apart by morphology alone
DEMO_TISSUES = ('tumour', 'lymphocytes', 'stroma')
# eosin and haematoxylin RGB of each synthetic centre: every site stains its own way (TCGA's do)
CENTRE_STAINS = [((232, 150, 196), (92, 52, 142)), ((214, 160, 180), (70, 62, 128))]
# each slide's stain also varies a little around its centre's: RGB standard deviation
SLIDE_STAIN_JITTER = 6.0
# The committee demo asks two questions of the same tissue: which cells (COMMITTEE_CELLS), and
# which matrix is around them (MATRICES): collagenous stroma, pink, or myxoid stroma, lilac. Its
# stains make the two answers two directions of colour that G2L's augmentation never mixes: the
# nuclei differ from the matrix in brightness alone (haematoxylin = eosin - 90 in R, G and B; no
# slide jitter), the two matrices along MATRIX_AXIS, which changes neither the luma
# (0.299 R + 0.587 G + 0.114 B) nor the brightness; hue, saturation, brightness and contrast
# jitter keep both so. A model that sees the luma only sees the nuclei and never the matrix; a
# model that sees MATRIX_AXIS only, the matrix and never the nuclei
COMMITTEE_CELLS = ('tumour', 'lymphocytes')
MATRICES = ('collagenous', 'myxoid')
LUMA = np.array([0.299, 0.587, 0.114])
MATRIX_AXIS = np.cross(LUMA, np.ones(3))
MATRIX_AXIS /= np.linalg.norm(MATRIX_AXIS)
# the matrices' eosin: a pink moved +/- MATRIX_SHIFT along MATRIX_AXIS (RGB units)
MATRIX_SHIFT = 12.0
_pink = np.array((210.0, 140.0, 185.0))
COMMITTEE_STAINS = [tuple(tuple(float(v) for v in c.round(3)) for c in (eosin, eosin - 90))
                    for eosin in (_pink + MATRIX_SHIFT * MATRIX_AXIS,
                                  _pink - MATRIX_SHIFT * MATRIX_AXIS)]
# tissue is drawn at 40x and box-averaged to coarser pixels, as a scanner's pyramid is
RENDER_MPP = 0.25


def nucleus_outlines(rng, tissue, n, size, direction):
    """x and y (n, 24) of n nuclei of `tissue` as 24-point ellipses, anywhere in a size px square
    at RENDER_MPP µm/px."""
    (long_low, long_high), (ratio_low, ratio_high), spread, _ = TISSUES[tissue]
    long_px = rng.uniform(long_low, long_high, (n, 1)) / RENDER_MPP
    short_px = long_px * rng.uniform(ratio_low, ratio_high, (n, 1))
    if spread is None:
        angle = rng.uniform(0, math.pi, (n, 1))
    else:
        angle = direction + rng.normal(0, spread, (n, 1))
    x, y = rng.uniform(0, size, (2, n, 1))
    t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    along, across = long_px * np.cos(t), short_px * np.sin(t)
    xs = x + along * np.cos(angle) - across * np.sin(angle)
    ys = y + along * np.sin(angle) + across * np.cos(angle)
    return xs, ys


def nuclei_map(rng, tissue, size, seamless=False):
    """Haematoxylin fraction in [0, 1] of a size px square of `tissue` at RENDER_MPP µm/px.
    seamless: a nucleus over an edge comes back on the other side, so the square tiles."""
    (long_low, long_high), (ratio_low, ratio_high), _, cover_range = TISSUES[tissue]
    cover = rng.uniform(*cover_range)
    direction = rng.uniform(0, math.pi)
    # as many nuclei as cover that fraction on average (overlaps hide a little, in every class)
    mean_long_px = (long_low + long_high) / 2 / RENDER_MPP
    mean_area = math.pi * mean_long_px ** 2 * (ratio_low + ratio_high) / 2
    n = round(cover * size * size / mean_area)
    xs, ys = nucleus_outlines(rng, tissue, n, size, direction)
    canvas = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    shifts = [-size, 0, size] if seamless else [0]
    for dx in shifts:
        for dy in shifts:
            # a shifted copy is drawn only where it reaches into the square
            reaches = ((xs.max(1) + dx > 0) & (xs.min(1) + dx < size) &
                       (ys.max(1) + dy > 0) & (ys.min(1) + dy < size))
            for px, py in zip(xs[reaches] + dx, ys[reaches] + dy):
                draw.polygon(list(zip(px.tolist(), py.tolist())), fill=255)
    return np.asarray(canvas, np.float32) / 255


def slide_stain(rng, centre, stains=CENTRE_STAINS, jitter_sd=SLIDE_STAIN_JITTER):
    """(eosin, haematoxylin) RGB of one slide of `centre` (an index into stains): the centre's
    stain plus the slide's."""
    eosin, haematoxylin = (np.array(c, np.float32) for c in stains[centre])
    jitter = rng.normal(0, jitter_sd, 3).astype(np.float32)
    # haematoxylin is the darker stain, and varies less in RGB
    return eosin + jitter, haematoxylin + jitter / 2


def stain_nuclei(nuclei, stain, noise):
    """RGB float of a nuclei map in a (eosin, haematoxylin) stain, plus the scanner's noise."""
    eosin, haematoxylin = stain
    haematoxylin_fraction = nuclei[..., None]
    return eosin * (1 - haematoxylin_fraction) + haematoxylin * haematoxylin_fraction + noise


def render_patch(rng, tissue, size, mpp, stain):
    """A uint8 (size, size, 3) RGB patch of new cells of `tissue` at `mpp` µm/px (a multiple of
    RENDER_MPP): drawn at RENDER_MPP and box-averaged, exactly as a synthetic slide's level is."""
    factor = round(mpp / RENDER_MPP)
    nuclei = nuclei_map(rng, tissue, size * factor)
    nuclei = nuclei.reshape(size, factor, size, factor).mean((1, 3))
    # the scanner's noise at this pixel size, from anywhere in the shared noise texture
    noise = noise_pyramid()[round(math.log2(factor))]
    y, x = rng.integers(0, len(noise) - size, 2)
    rgb = stain_nuclei(nuclei, stain, noise[y:y + size, x:x + size])
    return np.clip(rgb, 0, 255).astype(np.uint8)


def box_pyramid(image):
    """image and its 2 × 2 box-averaged copies down to 1 px, finest first; copies smaller than a
    tile are repeated up to 256 px so a tile is always a plain slice."""
    size = len(image)
    pyramid = []
    while size >= 1:
        repeats = (max(1, 256 // size),) * 2 + (1,) * (image.ndim - 2)
        pyramid.append(np.tile(image, repeats))
        size //= 2
        if size:
            image = image.reshape(size, 2, size, 2, *image.shape[2:]).mean((1, 3))
    return pyramid


@functools.lru_cache(maxsize=12)
def nuclei_pyramid(tissue, variant, size=2048):
    """Box pyramid of a seamless 512 µm square of `tissue`'s nuclei map at RENDER_MPP, as uint8
    (255 = all haematoxylin). Four variants a tissue give the slides of one tissue other cells."""
    rng = np.random.default_rng([list(TISSUES).index(tissue), variant])
    nuclei = nuclei_map(rng, tissue, size, seamless=True)
    return [np.round(copy * 255).astype(np.uint8) for copy in box_pyramid(nuclei)]


@functools.lru_cache(maxsize=1)
def noise_pyramid(size=2048):
    """Box pyramid of the scanner's noise over a 512 µm square, shared by every tissue texture."""
    rng = np.random.default_rng(0)
    return box_pyramid(8 * rng.standard_normal((size, size, 3), np.float32))


def tissue_textures(blob_tissues, variant, stain, copy):
    """Each blob's tissue as packed RGBX at pyramid copy `copy` (0 = RENDER_MPP), in the stain."""
    noise = noise_pyramid()
    packed = {}
    for tissue in set(blob_tissues):
        nuclei = nuclei_pyramid(tissue, variant)
        nuclei = nuclei[min(copy, len(nuclei) - 1)].astype(np.float32) / 255
        rgb = stain_nuclei(nuclei, stain, noise[min(copy, len(noise) - 1)])
        packed[tissue] = pack_rgbx(rgb)
    return [packed[tissue] for tissue in blob_tissues]


def synthetic_masks(layout, u, v):
    """Tissue and pen-stroke masks at pixel centres u, v (slide fractions) of a synthetic slide,
    and the blob each pixel belongs to: the one whose Gaussian is the largest there."""
    inside = (u < 1) & (v < 1) & (not layout['blank'])
    # tissue where the blobs' Gaussians add up to more than 0.5, or everywhere
    field = np.float32(layout['full_tissue'])
    largest, blob = 0, 0
    for i, (cx, cy, sx, sy) in enumerate(layout['blobs']):
        gaussian = np.exp(-0.5 * ((v - cy) / sy) ** 2) * np.exp(-0.5 * ((u - cx) / sx) ** 2)
        field = field + gaussian
        blob = np.where(gaussian > largest, i, blob)
        largest = np.maximum(gaussian, largest)
    tissue = (field > 0.5) & inside
    # the pen stroke: a ring around the pen circle's centre, d2 in µm²
    width_um, height_um = layout['physical']
    pen_x, pen_y, radius, half_width = layout['pen']
    d2 = (u * width_um - pen_x) ** 2 + (v * height_um - pen_y) ** 2
    ring = (d2 > (radius - half_width) ** 2) & (d2 < (radius + half_width) ** 2) & inside
    return tissue, ring, blob


def texture_window(tx, ty, period):
    """The 256 px slice of a seamless texture of `period` px under the tile at (tx, ty)."""
    return np.s_[ty % period:ty % period + 256, tx % period:tx % period + 256]


def synthetic_level(layout, w, h, tissue_px=None):
    """The 256 px RGB tiles of a w × h level of the synthetic slide, in the order tifffile writes
    them; appends each tile's tissue pixel count (pen excluded) per blob to tissue_px when given."""
    textures = _stain_textures(layout['glass_rgb'])
    # this level's pixel in 0.25 µm units picks the texture copy
    scale = layout['mpp'] / 0.25 * layout['width'] / w
    copy = max(0, round(math.log2(scale)))
    stain, glass = textures[min(len(textures) - 1, copy)]
    # with tissue classes, each blob shows its own tissue's texture, all of one period
    blob_textures = []
    if layout['blob_tissues']:
        blob_textures = tissue_textures(layout['blob_tissues'], layout['variant'],
                                        layout['stain'], copy)
    period = len(stain)
    pen_rgbx = np.array([40, 90, 180, 0], np.uint8).view(np.uint32)[0]
    n_blobs = len(layout['blobs'])
    for ty in range(0, h, 256):
        for tx in range(0, w, 256):
            # pixel centres, in slide fractions
            u = ((tx + np.arange(256, dtype=np.float32) + 0.5) / w)[None, :]
            v = ((ty + np.arange(256, dtype=np.float32) + 0.5) / h)[:, None]
            tissue, ring, blob = synthetic_masks(layout, u, v)
            window = texture_window(tx, ty, period)
            if blob_textures:
                blob_window = texture_window(tx, ty, len(blob_textures[0]))
                tissue_rgbx = np.choose(blob, [texture[blob_window] for texture in blob_textures])
            else:
                tissue_rgbx = stain[window]
            rgbx = np.where(tissue, tissue_rgbx, glass[window])
            rgbx[ring] = pen_rgbx
            if tissue_px is not None:
                counted = tissue & ~ring
                tissue_px.append(np.bincount(np.broadcast_to(blob, counted.shape)[counted],
                                             minlength=n_blobs))
            yield rgbx.view(np.uint8).reshape(256, 256, 4)[..., :3]


def synthetic_layout(width, height, mpp, seed=0, blank=False, full_tissue=False):
    """Where a synthetic slide's tissue and pen stroke are: what synthetic_masks draws from."""
    # tissue is laid out in slide fractions and the stain in µm, so the same seed at (w, h, 0.25)
    # and (w/2, h/2, 0.5) is the same glass scanned at 40x and 20x
    rng = np.random.default_rng(seed)
    # six tissue blobs: centre x, y and spread x, y, in slide fractions
    low, high = [0.25, 0.25, 0.06, 0.06], [0.75, 0.75, 0.14, 0.14]
    blobs = rng.uniform(low, high, (6, 4)).astype(np.float32)
    physical_um = np.array([width, height]) * mpp
    short_um = physical_um.min()
    # the pen circle in µm: centre x, y, radius, half-width of the stroke
    pen = (0.88 * physical_um[0], 0.15 * physical_um[1], 0.1 * short_um, 0.015 * short_um)
    return dict(width=width, mpp=mpp, blank=blank, full_tissue=full_tissue, blobs=blobs, pen=pen,
                physical=physical_um)


# JPEG markers (ITU T.81 table B.1): quantisation and Huffman tables, baseline frame, scan
DQT, DHT, SOF0, SOS = 0xDB, 0xC4, 0xC0, 0xDA
# tifffile's JPEG tiles: quality 80 (the Aperio description's Q=80), chroma halved both ways
JPEG_QUALITY, JPEG_SUBSAMPLING = 80, (2, 2)


def jpeg_segments(stream):
    """A JPEG stream's marker segments before its scan (SOI excluded), and the scan to EOI."""
    segments, at = [], 2
    while stream[at + 1] != SOS:
        length = int.from_bytes(stream[at + 2:at + 4], 'big')
        segments.append(stream[at:at + 2 + length])
        at += 2 + length
    return segments, stream[at:]


def aperio_jpeg(tile, rgb=False):
    """A 256 px RGB tile as an Aperio scanner stores it: (JPEGTables, tile), the tables (DQT, DHT)
    once for the whole level and the tile an abbreviated stream without them, nor a JFIF or Adobe
    marker. rgb: RGB-coded, as some Aperio files are, with component ids 0, 1, 2 that a decoder
    guessing the colour space takes for YCbCr; else YCbCr, the TIFF's photometric 6."""
    colour = dict(outcolorspace='RGB') if rgb else dict(outcolorspace='YCBCR',
                                                         subsampling=JPEG_SUBSAMPLING)
    tile = np.ascontiguousarray(tile)
    stream = imagecodecs.jpeg8_encode(tile, level=JPEG_QUALITY, colorspace='RGB', **colour)
    segments, scan = jpeg_segments(stream)
    # every tile has the same tables: libjpeg's quality-80 quantisation and standard Huffman tables
    tables = b'\xff\xd8' + b''.join(s for s in segments if s[1] in (DQT, DHT)) + b'\xff\xd9'
    frame, scan = bytearray(b''.join(s for s in segments if s[1] == SOF0)), bytearray(scan)
    if rgb:
        # libjpeg names RGB components 'R', 'G', 'B', which tells a decoder; Aperio's are 0, 1, 2
        for i in range(3):
            frame[10 + 3 * i] = scan[5 + 2 * i] = i
    return tables, b'\xff\xd8' + frame + scan


def aperio_codec(tiles, rgb):
    """tifffile.write's arguments for a level's tiles stored as aperio_jpeg makes them."""
    tables = aperio_jpeg(np.zeros((256, 256, 3), np.uint8), rgb)[0]
    # tifffile writes bytes as they are; photometric 2 (RGB) or 6 (YCbCr) tells the decoder
    colour = dict(outcolorspace='RGB') if rgb else dict(outcolorspace='YCBCR')
    subsampling = (1, 1) if rgb else JPEG_SUBSAMPLING
    stored = (aperio_jpeg(tile, rgb)[1] for tile in tiles)
    return dict(tiles=stored, compression='jpeg', jpegtables=tables, subsampling=subsampling,
                compressionargs=colour)


def write_synthetic_slide(path, width=4096, height=3072, mpp=0.25, seed=0, aperio=False,
                          blank=False, full_tissue=False, tissues=(), centre=0,
                          glass_rgb=(245, 245, 245), rgb_jpeg=False, compression='jpeg',
                          stains=CENTRE_STAINS, stain_jitter=SLIDE_STAIN_JITTER):
    """Write an H&E-like pyramidal TIFF that OpenSlide opens: a few tissue blobs with nuclei on
    glass of colour glass_rgb, white by default (or tissue filling the scan: full_tissue), and a
    blue pen circle, level 0 at `mpp` µm/px. Returns {'tissue_fraction': exact level-0 tissue
    fraction (pen excluded), 'mpp', 'size', 'levels', 'pen', 'layout'}.

    tissues: () draws every blob in one generic texture; names of TISSUES give blob i the tissue
    tissues[i % len(tissues)] in the stain of centre `centre` of `stains` (plus the slide's own,
    stain_jitter), and add 'tissue_fractions' {tissue: exact level-0 fraction of the slide}.

    aperio=True writes the JPEG tiles as Aperio does (aperio_jpeg; rgb_jpeg: RGB-coded, not
    YCbCr); compression: tifffile's name of the tiles' compression ('lzw', 'deflate') otherwise."""
    layout = synthetic_layout(width, height, mpp, seed, blank, full_tissue)
    n_blobs = len(layout['blobs'])
    blob_tissues = [tissues[i % len(tissues)] for i in range(n_blobs)] if tissues else []
    layout['blob_tissues'] = blob_tissues
    # the stain is drawn from its own stream: a seed's layout is the same with or without tissues
    layout['stain'] = slide_stain(np.random.default_rng([seed, 1]), centre, stains, stain_jitter)
    layout['variant'] = seed % 4
    layout['glass_rgb'] = tuple(glass_rgb)
    # levels halve, or quarter like Aperio's when aperio=True
    sizes = [(width, height)]
    while max(sizes[-1]) > 512:
        sizes.append(tuple(-(-s // (4 if aperio else 2)) for s in sizes[-1]))
    # aperio=True also writes an Aperio ImageDescription instead of resolution tags
    description = None
    if aperio:
        description = (f'Aperio Image Library v12.0.15 \r\n{width}x{height} '
                       f'[0,0 {width}x{height}] (256x256) JPEG/RGB '
                       f'Q=80|MPP = {mpp}|AppMag = {10 / mpp:g}')
    tissue_px = []
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2 ** 31) as tif:
        for level, (w, h) in enumerate(sizes):
            tiles = synthetic_level(layout, w, h, tissue_px if w == width else None)
            resolution = {}
            if not aperio:
                pixels_per_cm = 1e4 / (mpp * width / w)
                resolution = dict(resolution=(pixels_per_cm,) * 2, resolutionunit='CENTIMETER')
            codec = dict(compression=compression)
            if compression == 'jpeg':
                codec['compressionargs'] = {'level': JPEG_QUALITY}
            if aperio:
                codec = aperio_codec(tiles, rgb_jpeg)
                tiles = codec.pop('tiles')
            tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(256, 256), photometric='rgb',
                      subfiletype=1 if level else 0,
                      description=description if level == 0 else None, metadata=None,
                      **codec, **resolution)
    blob_px = np.sum(tissue_px, axis=0)
    result = {'tissue_fraction': blob_px.sum() / (width * height), 'mpp': mpp,
              'size': (width, height), 'levels': sizes,
              'pen': tuple(p / mpp for p in layout['pen']), 'layout': layout}
    if tissues:
        fractions = dict.fromkeys(tissues, 0.0)
        for tissue, px in zip(blob_tissues, blob_px):
            fractions[tissue] += px / (width * height)
        result['tissue_fractions'] = fractions
    return result


def synthetic_crops(n, size=224, mpp=0.5, seed=0, tissues=DEMO_TISSUES):
    """n random crops of the textures synthetic slides draw `tissues` from, each in a slide stain
    of a random centre: uint8 (n, size, size, 3), tissue index into `tissues` (n,), centre (n,)."""
    # cheap (slices, no drawing): what the demo teacher is trained on, as a giga model is
    # pretrained on slides of the kind it will be distilled on
    rng = np.random.default_rng(seed)
    tissue_index = rng.integers(0, len(tissues), n)
    centres = rng.integers(0, len(CENTRE_STAINS), n)
    crops = np.empty((n, size, size, 3), np.uint8)
    for i, (tissue, centre) in enumerate(zip(tissue_index, centres)):
        crops[i] = texture_crop(rng, tissues[tissue], centre, size, mpp)
    return crops, tissue_index, centres


def committee_crops(n, size=224, mpp=0.5, seed=0):
    """n random crops of the committee demo's textures: uint8 (n, size, size, 3), which cells
    (index into COMMITTEE_CELLS) and which matrix (index into MATRICES) each shows (n,)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(COMMITTEE_CELLS), n)
    matrices = rng.integers(0, len(MATRICES), n)
    crops = np.empty((n, size, size, 3), np.uint8)
    for i, (cell, matrix) in enumerate(zip(cells, matrices)):
        crops[i] = texture_crop(rng, COMMITTEE_CELLS[cell], matrix, size, mpp, COMMITTEE_STAINS,
                                0.0)
    return crops, cells, matrices


def texture_crop(rng, tissue, centre, size, mpp, stains=CENTRE_STAINS,
                 stain_jitter=SLIDE_STAIN_JITTER):
    """A uint8 (size, size, 3) crop of one of the textures the slides draw `tissue` from, at mpp
    µm/px, in a slide stain of centre `centre` of `stains`."""
    copy = round(math.log2(mpp / RENDER_MPP))
    nuclei = nuclei_pyramid(tissue, int(rng.integers(4)))[copy]
    y, x = rng.integers(0, len(nuclei) - size, 2)
    window = np.s_[y:y + size, x:x + size]
    stain = slide_stain(rng, centre, stains, stain_jitter)
    noise = noise_pyramid()[copy][window]
    rgb = stain_nuclei(nuclei[window].astype(np.float32) / 255, stain, noise)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_synthetic_patches(root, slides_per_split=(6, 2, 4), patches_per_slide=8, size=224,
                            mpp=0.5, seed=0, tissues=DEMO_TISSUES, classes=None,
                            stains=CENTRE_STAINS, stain_jitter=SLIDE_STAIN_JITTER):
    """A labelled patch set of synthetic tissues: root/<split>/<label>/<slide>_<i>.png and
    root/labels.csv (path,label,split,center,slide), a slide per label, split and index. Every
    patch is drawn anew, never seen by a model trained on slides or synthetic_crops. classes:
    {label: (tissue, centre)}, the centre an index into `stains` or None: going round them from
    slide to slide; by default each of `tissues`, its centre going round. Returns the CSV's
    path."""
    classes = classes or {tissue: (tissue, None) for tissue in tissues}
    rng = np.random.default_rng(seed)
    rows = []
    for label, (tissue, label_centre) in classes.items():
        for split, n_slides in zip(('train', 'val', 'test'), slides_per_split):
            os.makedirs(os.path.join(root, split, label), exist_ok=True)
            for i in range(n_slides):
                centre = i % len(stains) if label_centre is None else label_centre
                # a stain that is part of the class is no centre's: such a set has one centre,
                # and no robustness index (it would read the class as the centre)
                center = f'centre{centre}' if label_centre is None else 'centre0'
                slide = f'{label}-{split}-{i}'
                # the patches of one slide share its stain, as the tiles of a real slide do
                stain = slide_stain(rng, centre, stains, stain_jitter)
                for j in range(patches_per_slide):
                    path = os.path.join(split, label, f'{slide}_{j}.png')
                    patch = render_patch(rng, tissue, size, mpp, stain)
                    Image.fromarray(patch).save(os.path.join(root, path))
                    rows.append(dict(path=path, label=label, split=split, center=center,
                                     slide=slide))
    labels = os.path.join(root, 'labels.csv')
    write_csv(labels, ['path', 'label', 'split', 'center', 'slide'], rows)
    return labels


def committee_classes():
    """The committee demo's labels, {'tumour-collagenous': ('tumour', 0), ...}: each of
    COMMITTEE_CELLS in each of MATRICES, the matrix an index into COMMITTEE_STAINS."""
    return {f'{cell}-{matrix}': (cell, k)
            for cell in COMMITTEE_CELLS for k, matrix in enumerate(MATRICES)}


def write_colour_patches(root, slides_per_split=(3, 1, 2), tiles_per_slide=4, size=64, seed=0):
    """Small PNG tiles of 3 colour/texture classes from 2 centres, written as an ImageFolder under
    root and listed in root/labels.csv with center and slide columns; returns the CSV's path. For
    the tests: any encoder tells these apart by colour (write_synthetic_patches draws the demo's
    tissues, which differ in morphology only)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    dense_dark_dots = ((xx % 12 < 5) & (yy % 12 < 5)) * 2.0 - 1
    pink_fibres = np.sin(xx / 3.0)
    purple_blobs = np.sin(xx / 5.0) * np.sin(yy / 5.0)
    # each class: an RGB colour and a texture in [-1, 1]
    classes = {'lymphocytes': ((80, 60, 150), dense_dark_dots),
               'stroma': ((230, 150, 190), pink_fibres),
               'tumor': ((150, 90, 170), purple_blobs)}
    rows = []
    for label, (colour, texture) in classes.items():
        for split, n_slides in zip(SPLITS, slides_per_split):
            for s in range(n_slides):
                os.makedirs(os.path.join(root, split, label), exist_ok=True)
                slide, center = f'{label}-{split}-{s}', f'center{s % 2}'
                # a stain shift per centre plus one per slide: within a lab, slides vary too
                stain = np.array([12, -8, 10]) * (1 if s % 2 else -1) + rng.normal(0, 20, 3)
                for t in range(tiles_per_slide):
                    noise = rng.normal(0, 10, (size, size, 3))
                    pixels = np.array(colour) + stain + 40 * texture[..., None] + noise
                    path = os.path.join(split, label, f'{slide}_{t}.png')
                    tile = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                    tile.save(os.path.join(root, path))
                    rows.append(dict(path=path, label=label, split=split, center=center,
                                     slide=slide))
    csv_path = os.path.join(root, 'labels.csv')
    write_csv(csv_path, ['path', 'label', 'split', 'center', 'slide'], rows)
    return csv_path
