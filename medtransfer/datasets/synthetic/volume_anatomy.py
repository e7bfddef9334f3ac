"""The chest CT phantom: anatomy in Hounsfield units, drawn in millimetres on the scan's voxel grid.

A patient is a :class:`Torso` (body size, fat, lungs, diaphragm, heart, vessel tree, nodules if any), drawn
once per patient so that a follow-up study shows the same anatomy. :func:`render_ct` paints it on a grid of
voxel centres given in the patient frame (x towards the patient's left, y posterior, z superior, mm; the DICOM
patient coordinate system up to a table offset), so anatomy keeps its size in mm at any resolution and the
scanner (``sites``) only decides pixel spacing, coverage, blur and noise.

Everything is vectorised numpy drawn from the caller's generator in a fixed order: a volume is a pure function
of its seeds (changing the order of any draw changes every file: bump ``VOLUME_GENERATOR_VERSION``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

AIR, FAT, MUSCLE, BLOOD, LUNG, BONE, LIVER, TABLE = -1000.0, -100.0, 45.0, 40.0, -860.0, 650.0, 60.0, -300.0
# A steel skin marker attenuates like ~20000 HU: even a voxel it fills a tenth of saturates at the top of the
# stored range (3071), as real metal does whatever the voxel size.
METAL = 20000.0


@dataclass(frozen=True)
class Nodule:
    """A lung nodule in the patient frame (mm) with its attenuation (HU) and lobulation phases."""

    x: float
    y: float
    z: float
    diameter: float
    hu: float
    solid: bool
    phases: tuple[float, float]


@dataclass(frozen=True)
class Torso:
    """One patient's anatomy, in mm in the patient frame (origin on the midline at the level of the carina)."""

    body_a: float  # left-right semi-axis of the body
    body_b: float  # anterior-posterior semi-axis
    fat: float  # subcutaneous fat thickness
    breasts: bool
    lung_top: float  # z of the lung apices
    dome: float  # z of the lowest point of the diaphragm domes (costophrenic recesses)
    dome_height: float
    heart_scale: float
    stomach_air: bool
    vessels: tuple[tuple[float, ...], ...]  # segments: x0, y0, z0, x1, y1, z1, radius
    nodules: tuple[Nodule, ...]  # empty for a patient without nodules


def draw_torso(rng: np.random.Generator, sex: str, age: int, positive: bool,
               nodule_mm: tuple[float, float]) -> Torso:
    """Draw one patient's anatomy (and, for a positive patient, 1-3 nodules: 60/30/10%)."""
    male = sex == "M"
    body_a = rng.normal(168 if male else 152, 11)
    body_b = rng.normal(112 if male else 102, 9) + 0.1 * (age - 55)
    fat = float(np.clip(rng.normal(16 if male else 22, 6), 5, 40))
    lung_top = rng.normal(112, 8)
    dome = rng.normal(-150, 10)
    dome_height = rng.normal(48, 6)
    heart_scale = rng.normal(1.0 + 0.002 * (age - 55), 0.06)
    stomach_air = bool(rng.random() < 0.6)
    torso = Torso(body_a, body_b, fat, not male and rng.random() < 0.9, lung_top, dome, dome_height,
                  heart_scale, stomach_air, (), ())
    vessels = tuple(seg for side in (-1, 1) for seg in _vessel_tree(rng, torso, side))
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) if positive else 0
    nodules = tuple(sorted((_draw_nodule(rng, torso, nodule_mm) for _ in range(count)), key=lambda n: -n.diameter))
    return Torso(**{**torso.__dict__, "vessels": vessels, "nodules": nodules})


def cavity(t: Torso) -> tuple[float, float]:
    """Semi-axes of the thoracic cavity (inside fat, muscle and ribs)."""
    return t.body_a - t.fat - 16, t.body_b - t.fat - 14


def lung_geometry(t: Torso, side: int) -> tuple[float, float, float, float]:
    """Centre (x, y) and semi-axes (lateral, anterior-posterior) of one lung's cross-section at full width."""
    ca, cb = cavity(t)
    return side * 0.5 * ca, 0.02 * cb, 0.5 * ca, 0.97 * cb


def _vessel_tree(rng: np.random.Generator, t: Torso, side: int) -> list[tuple[float, ...]]:
    """Pulmonary vessels of one lung: trunks from the hilum branching twice, tapering towards the periphery."""
    cx, cy, la, lb = lung_geometry(t, side)
    hilum = np.array([side * 0.3 * cavity(t)[0], 0.05 * cavity(t)[1], -25.0])
    segments: list[tuple[float, ...]] = []
    for k in range(5):
        angle = np.deg2rad(-80 + 40 * k + rng.normal(0, 10))  # from cranial to caudal, pointing laterally
        direction = np.array([side * np.cos(angle) * 0.8, rng.normal(0, 0.5), np.sin(angle) * 1.2])
        _branch(rng, hilum, direction / np.linalg.norm(direction), rng.uniform(40, 60), 3.5, 2, segments)
    return segments


def _branch(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float, radius: float,
            depth: int, out: list[tuple[float, ...]]) -> None:
    end = start + direction * length
    out.append((*start.tolist(), *end.tolist(), radius))
    if depth == 0:
        return
    for _ in range(2):
        turn = rng.normal(0, 0.45, 3)
        child = direction + turn - direction * float(direction @ turn)
        _branch(rng, end, child / np.linalg.norm(child), length * rng.uniform(0.6, 0.8), radius * 0.65,
                depth - 1, out)


def _draw_nodule(rng: np.random.Generator, t: Torso, nodule_mm: tuple[float, float]) -> Nodule:
    """A nodule inside one lung: size log-uniform in ``nodule_mm``, mostly solid, some subsolid (ground glass).

    Its centre and six points one radius (+2 mm) away must lie in the lung, so it is not hidden in the
    mediastinum or chest wall (the lung occupancy is the one the renderer paints); a nodule too large for
    this patient's lungs shrinks until it fits.
    """
    diameter = float(np.exp(rng.uniform(*np.log(nodule_mm))))
    solid = bool(rng.random() < 0.8)
    hu = float(rng.normal(30, 15) if solid else rng.uniform(-550, -250))
    phases = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))
    while True:
        reach = diameter / 2 + 2
        offsets = np.array([[0, 0, 0], *(s * np.eye(3)[i] * reach for i in range(3) for s in (-1, 1))])
        for _ in range(200):  # rejection sampling inside the bounding box of the lungs
            side = 1 if rng.random() < 0.45 else -1  # the right lung (side -1) is larger
            cx, cy, la, lb = lung_geometry(t, side)
            centre = np.array([cx + la * rng.uniform(-1, 1), cy + lb * rng.uniform(-1, 1),
                               rng.uniform(t.dome, t.lung_top)])
            pts = centre + offsets
            if lung_occupancy(pts[:, 0], pts[:, 1], pts[:, 2], t, 0.5).min() > 0.5:
                return Nodule(*map(float, centre), diameter, hu, solid, phases)
        diameter *= 0.8


def _apex_scale(z: np.ndarray, t: Torso) -> np.ndarray:
    # The lungs narrow towards the apex (rounded dome of about 70 mm).
    return np.sqrt(np.clip((t.lung_top - z) / 70.0, 0, 1))


@dataclass(frozen=True)
class Grid:
    """Voxel centres in the patient frame: x (W,), y (H,), z (D,) in mm, and the voxel size (dz, dy, dx)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return float(self.z[1] - self.z[0]), float(self.y[1] - self.y[0]), float(self.x[1] - self.x[0])

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (1, 1, W), (1, H, 1), (D, 1, 1) coordinate arrays."""
        return self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]


def render_ct(t: Torso, grid: Grid, rng: np.random.Generator, *, table: str,
              marker: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint the patient on ``grid``: ideal HU (before the scanner's blur and noise) and the lung mask.

    Args:
        t: the patient's anatomy.
        grid: voxel centres in the patient frame (mm).
        rng: texture draws.
        table: the scanner's couch profile, "flat", "curved" or "thick".
        marker: position (x, y, z mm) of a metal skin marker, or None.

    Returns:
        float32 (D, H, W) HU and the float32 (D, H, W) lung mask in [0, 1].
    """
    x, y, z = grid.mesh()
    soft = 0.5 * min(grid.spacing[1:])  # edge width of large structures
    shape = (len(grid.z), len(grid.y), len(grid.x))
    hu = np.full(shape, AIR, np.float32)
    body = _ellipse(x, y, 0, 0, t.body_a, t.body_b, soft)
    if t.breasts:
        for s in (-1, 1):
            body = np.maximum(body, _ellipse(x, y, s * 0.38 * t.body_a, -0.8 * t.body_b, 0.34 * t.body_a,
                                             0.3 * t.body_b, soft) * _between(z, -130, -10, 8))
    hu = _paint(hu, np.broadcast_to(body, shape), FAT + 15 * _smooth(rng, shape, 4))
    ca, cb = cavity(t)
    hu = _paint(hu, _ellipse(x, y, 0, 0, ca + 14, cb + 12, soft), MUSCLE)
    thorax = _ellipse(x, y, 0, 0, ca, cb, soft)
    hu = _paint(hu, thorax, -70.0)  # mediastinal and pericardial fat
    abdomen, liver = _abdomen(x, y, z, t, soft)
    hu = _paint(hu, abdomen * thorax, 35.0)
    hu = _paint(hu, liver * thorax, LIVER)
    if t.stomach_air:
        hu = _paint(hu, _ellipsoid(x, y, z, 0.45 * ca, -0.25 * cb, t.dome + 5, 30, 22, 14, soft), AIR)
    lung = np.broadcast_to(lung_occupancy(x, y, z, t, soft), shape)
    texture = LUNG + 25 * _smooth(rng, shape, 6) + 70 * np.clip(y / cb, -1, 1)  # dependent lung is denser
    hu = _paint(hu, lung, texture)
    vessels = np.zeros(shape, np.float32)
    for seg in t.vessels:
        vessels = np.maximum(vessels, _tube(grid, seg, soft))
    hu = _paint(hu, vessels * lung, BLOOD)
    for nodule in t.nodules:
        hu = _paint(hu, nodule_mask(nodule, grid, soft) * np.clip(lung * 2, 0, 1), nodule.hu)
    hu = _paint(hu, _heart(x, y, z, t, soft), BLOOD)
    for seg, value in _great_vessels(t):
        hu = _paint(hu, _tube(grid, seg, soft), value)
    hu = _paint_spine(hu, x, y, z, cb, soft)
    hu = _paint(hu, _ribs(x, y, z, t, soft), BONE)
    hu = _paint(hu, _box(x, y, 0, -cb - 4, 14, 5, soft) * _between(z, -120, 50, 4), BONE - 200)  # sternum
    if marker is not None:
        mx, my, mz = marker
        hu = _paint(hu, _ellipsoid(x, y, z, mx, my, mz, 3.5, 3.5, 3.5, soft), METAL)
    hu = _paint(hu, _table(x, y, t, table, soft), TABLE)
    return hu.astype(np.float32), lung.astype(np.float32)


def nodule_mask(n: Nodule, grid: Grid, soft: float) -> np.ndarray:
    """Soft (D, H, W) mask of a lobulated sphere: radius modulated by low-order harmonics (+-12%)."""
    x, y, z = grid.mesh()
    soft = min(soft, 0.3 * min(grid.spacing[1:]))  # crisp: a nodule is sharply marginated against lung
    dx, dy, dz = x - n.x, y - n.y, z - n.z
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    theta, phi = np.arctan2(dy, dx), np.arccos(np.clip(dz / np.maximum(r, 1e-6), -1, 1))
    radius = n.diameter / 2 * (1 + 0.12 * np.sin(3 * theta + n.phases[0]) * np.cos(2 * phi + n.phases[1]))
    return expit((radius - r) / soft).astype(np.float32)


def skin_point(rng: np.random.Generator, t: Torso) -> tuple[float, float, float]:
    """A point on the anterior or lateral skin over the lungs (where a skin marker would be taped)."""
    angle = rng.uniform(-0.95, 0.95) * np.pi / 2  # 0 = anterior midline, +-90 degrees = lateral
    z = rng.uniform(t.dome + t.dome_height, t.lung_top - 20)
    return float(t.body_a * np.sin(angle) * 1.02), float(-t.body_b * np.cos(angle) * 1.02), float(z)


def metal_streaks(shape: tuple[int, int], centre: tuple[float, float], phases: np.ndarray, amplitude: float,
                  reach: float) -> np.ndarray:
    """In-plane streak artefact around a metal object: alternating bright and dark rays fading with distance.

    Args:
        shape: (H, W) of the slice.
        centre: (row, col) of the metal in pixels.
        phases: three angles (radians) that turn the ray patterns.
        amplitude: HU of the rays next to the metal.
        reach: distance (pixels) over which the rays fade by a factor e.
    """
    rr, cc = np.mgrid[0: shape[0], 0: shape[1]].astype(np.float32)
    dr, dc = rr - centre[0], cc - centre[1]
    angle = np.arctan2(dr, dc)
    rays = sum(np.cos(k * angle + p) for k, p in zip((5, 7, 11), phases, strict=True)) / 3
    fade = np.exp(-np.hypot(dr, dc) / reach)
    return (amplitude * np.sign(rays) * np.abs(rays) ** 0.5 * fade).astype(np.float32)


# -- shapes -------------------------------------------------------------------------------------------------


def _paint(hu: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    """Alpha-composite ``value`` over ``hu`` with the soft ``mask`` (painter's algorithm)."""
    return hu + mask * (value - hu)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, soft: float) -> np.ndarray:
    # Soft edge about ``soft`` mm wide: distance to the boundary approximated along the mean radius.
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return expit((1 - r) * (a + b) / 2 / soft).astype(np.float32)


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, cx: float, cy: float, cz: float, a: float, b: float,
               c: float, soft: float) -> np.ndarray:
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2)
    return expit((1 - r) * (a + b + c) / 3 / soft).astype(np.float32)


def _box(x: np.ndarray, y: np.ndarray, cx: float, cy: float, hx: float, hy: float, soft: float) -> np.ndarray:
    return (expit((hx - np.abs(x - cx)) / soft) * expit((hy - np.abs(y - cy)) / soft)).astype(np.float32)


def _between(z: np.ndarray, lo: float, hi: float, soft: float) -> np.ndarray:
    return (expit((z - lo) / soft) * expit((hi - z) / soft)).astype(np.float32)


def _smooth(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean unit-variance texture with blobs about 1/cells of the extent wide (coarse grid, cubic zoom)."""
    coarse = rng.standard_normal((max(2, cells * shape[0] // shape[2]), cells, cells)).astype(np.float32)
    img = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    img = img[: shape[0], : shape[1], : shape[2]]
    return (img - img.mean()) / (img.std() + 1e-6)


def _tube(grid: Grid, seg: tuple[float, ...], soft: float) -> np.ndarray:
    """Soft mask of a cylinder with round ends (a segment with a radius), computed inside its bounding box.

    Partial volume: a tube thinner than a pixel is drawn one pixel wide with its contrast scaled by the
    fraction of the pixel it fills (so a thin vessel is faint, not a bright pixel-wide line), with a crisp edge.
    """
    shape = (len(grid.z), len(grid.y), len(grid.x))
    out = np.zeros(shape, np.float32)
    pixel = min(grid.spacing[1:])
    p0, p1, radius = np.array(seg[:3]), np.array(seg[3:6]), max(seg[6], pixel / 2)
    fill, soft = min(1.0, (seg[6] / radius) ** 2), min(soft, 0.3 * pixel)
    lo, hi = np.minimum(p0, p1) - radius - 3 * soft, np.maximum(p0, p1) + radius + 3 * soft
    sl = []
    for axis, coords in ((2, grid.z), (1, grid.y), (0, grid.x)):
        i0, i1 = np.searchsorted(coords, lo[axis]), np.searchsorted(coords, hi[axis])
        if i0 >= i1:
            return out
        sl.append(slice(i0, i1))
    z, y, x = grid.z[sl[0], None, None], grid.y[None, sl[1], None], grid.x[None, None, sl[2]]
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
    out[sl[0], sl[1], sl[2]] = fill * expit((radius - dist) / soft)
    return out


def _lung(x: np.ndarray, y: np.ndarray, z: np.ndarray, t: Torso, side: int, soft: float) -> np.ndarray:
    """One lung: a rounded-box cross-section (filling its half of the cavity) narrowing to the apex, standing
    on its diaphragm dome."""
    cx, cy, la, lb = lung_geometry(t, side)
    ca, cb = cavity(t)
    scale = np.maximum(_apex_scale(z, t), 1e-3)
    r = (((x - cx) / la) ** 4 + ((y - cy) / lb) ** 4) ** 0.25
    r = np.maximum(r, np.sqrt((x / (0.97 * ca)) ** 2 + (y / (0.97 * cb)) ** 2))
    dome = t.dome + (15 if side < 0 else 0) + t.dome_height * np.sqrt(np.clip(1 - r * r, 0, 1))
    inside = expit((scale - r) * (la + lb) / 2 / soft) * expit((z - dome) / soft) * expit((t.lung_top - z) / soft)
    return inside.astype(np.float32)


def lung_occupancy(x: np.ndarray, y: np.ndarray, z: np.ndarray, t: Torso, soft: float) -> np.ndarray:
    """Where the lungs are (soft mask in [0, 1]): both lungs minus heart, mediastinum and spine.

    Works on any broadcastable coordinate arrays (mm), so nodules can be placed with the same geometry.
    """
    _, cb = cavity(t)
    lung = np.maximum(_lung(x, y, z, t, -1, soft), _lung(x, y, z, t, 1, soft))
    solid = np.maximum(_heart(x, y, z, t, soft), _box(x, y, 0, 0.05 * cb, 22, 0.3 * cb, soft))
    solid = np.maximum(solid, _ellipse(x, y, 0, 0.78 * cb + 15, 30, 42, soft))  # vertebra and paraspinal muscle
    return (lung * (1 - solid)).astype(np.float32)


def _abdomen(x: np.ndarray, y: np.ndarray, z: np.ndarray, t: Torso, soft: float) -> tuple[np.ndarray, np.ndarray]:
    """Everything under the diaphragm (soft tissue), and the liver under the right dome."""
    cx, cy, la, lb = lung_geometry(t, 1)
    r = np.sqrt((np.abs(x) - abs(cx)) ** 2 / la**2 + ((y - cy) / lb) ** 2)
    dome = t.dome + 15 * (x < 0) + t.dome_height * np.sqrt(np.clip(1 - r * r, 0, 1)) + 3
    below = expit((dome - z) / soft)
    liver = below * expit((15 - x) / (3 * soft)) * expit((z - t.dome + 60) / soft)
    return below.astype(np.float32), liver.astype(np.float32)


def _ribs(x: np.ndarray, y: np.ndarray, z: np.ndarray, t: Torso, soft: float) -> np.ndarray:
    """Ribs as oblique hoops in the chest wall: each descends about 45 mm from the spine to the front."""
    ca, cb = cavity(t)
    rho = np.sqrt((x / (ca + 6)) ** 2 + (y / (cb + 6)) ** 2)
    ring = expit((5 - np.abs(rho - 1) * (ca + cb) / 2) / soft)
    front = np.clip((-y / (cb + 6) + 1) / 2, 0, 1)  # 0 at the back, 1 at the front
    k = (z + 45 * front - (t.lung_top - 15)) / 26.0
    d = np.abs(k - np.round(k)) * 26.0
    keep = (k > -11.5) & (k < 0.5) & ((front < 0.85) | (np.abs(x) > 35))  # 12 pairs; cartilage gap in front
    return (ring * expit((5.5 - d) / soft) * keep).astype(np.float32)


def _paint_spine(hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, cb: float,
                 soft: float) -> np.ndarray:
    """Vertebral bodies (cortex and cancellous bone, discs every 28 mm), spinal canal, posterior arch."""
    vy = 0.78 * cb
    disc = expit((2.5 - np.abs(((z + 14) % 28) - 14)) / soft)
    body = _ellipse(x, y, 0, vy, 19, 16, soft)
    hu = _paint(hu, body, BONE * (1 - disc) + 80 * disc)
    hu = _paint(hu, _ellipse(x, y, 0, vy, 15, 12, soft) * (1 - disc), 230.0)
    hu = _paint(hu, _ellipse(x, y, 0, vy + 30, 17, 14, soft), BONE)
    hu = _paint(hu, _box(x, y, 0, vy + 50, 4, 14, soft), BONE)
    return _paint(hu, _ellipse(x, y, 0, vy + 29, 9, 8, soft), 20.0)


def _heart(x: np.ndarray, y: np.ndarray, z: np.ndarray, t: Torso, soft: float) -> np.ndarray:
    ca, cb = cavity(t)
    s = t.heart_scale
    return _ellipsoid(x, y, z, 0.18 * ca, -0.32 * cb, t.dome + t.dome_height + 28 * s, 0.42 * ca * s,
                      0.5 * cb * s, 52 * s, soft)


def _great_vessels(t: Torso) -> list[tuple[tuple[float, ...], float]]:
    """Aorta (ascending, arch, descending), pulmonary trunk, trachea and main bronchi as segments."""
    ca, cb = cavity(t)
    top = t.dome + t.dome_height + 60
    asc, desc = (-0.05 * ca, -0.2 * cb), (0.2 * ca, 0.6 * cb)
    arch = 35.0
    aorta = [(*asc, top, *asc, arch, 14.0), (*asc, arch, *desc, arch, 12.0), (*desc, arch, *desc, t.dome - 40, 12.0)]
    pulmonary = [(0.1 * ca, -0.3 * cb, top, 0.1 * ca, -0.1 * cb, -10, 13.0)]
    airway = [(0, -0.25 * cb, t.lung_top + 60, 0, 0.05 * cb, 0, 8.5)]
    bronchi = [(0, 0.05 * cb, 0, s * 0.28 * ca, 0.05 * cb, -25, 6.0) for s in (-1, 1)]
    return [(seg, BLOOD) for seg in aorta + pulmonary] + [(seg, AIR) for seg in airway + bronchi]


def _table(x: np.ndarray, y: np.ndarray, t: Torso, kind: str, soft: float) -> np.ndarray:
    """The scanner couch under the patient; its profile is the scanner's (a site effect in every image)."""
    top = t.body_b + 6
    if kind == "curved":
        return (expit((y - top - 0.0012 * x * x) / soft) * expit((top + 12 + 0.0012 * x * x - y) / soft)
                * expit((230 - np.abs(x)) / soft)).astype(np.float32)
    thick = 20 if kind == "thick" else 9
    return _box(x, y, 0, top + thick / 2, 220, thick / 2, soft)
