"""Procedural 16x16 pixel-art sprites: the built-in dataset that needs no download.

`generate(n, seed)` draws n sprites, class-balanced over `CLASSES`, as uint8 (n, 16, 16, 3) and
int32 labels (n,). Each class has a painter that draws a batch of index maps at once with numpy
(no per-sprite or per-pixel Python loop); then every sprite gets a jitter of up to one pixel, a
one-pixel outline, top-left lighting (light/mid/dark shades of each colour) and its own limited
palette on a plain light or dark background. 100k sprites take a few seconds.

`load_sprites(spec)` is the "sprites" source: spec.num_sprites of them from spec.sprite_seed.

Run `python -m diffusion.data.sprites --out docs/sprites.png` for a grid and the timing of 100k.
"""

from __future__ import annotations

import numpy as np

from diffusion.data import images as images_lib
from diffusion.data.dataset import Dataset, DataSpec

SIZE = 16
CLASSES = ("hero", "slime", "critter", "ghost", "potion", "sword", "gem", "mushroom")

# Paint codes used by the painters: background, ink (eyes, shoes), colour slots 0..3, white.
_BG, _OUTLINE, _INK, _SLOT, _WHITE = 0, 1, 2, 3, 7
_NUM_SLOTS = 4
# Final palette index: 0 bg, 1 outline, 2 ink, 3 + 3 * slot + shade (shade 0 dark .. 2 light),
# 15 white; so each sprite uses at most 16 colours.
_PALETTE_SIZE = 3 + 3 * _NUM_SLOTS + 1

_Y, _X = (a[None].astype(np.float32) for a in np.mgrid[:SIZE, :SIZE])
_AX = np.abs(_X - (SIZE - 1) / 2)  # distance from the vertical mirror axis: 0.5, 1.5, ...
_CHUNK = 8192  # sprites painted per vectorised pass (bounds temporary memory)


def _ints(rng, b, lo, hi):
  """(b, 1, 1) integers in [lo, hi] (inclusive)."""
  return rng.integers(lo, hi + 1, size=(b, 1, 1)).astype(np.float32)


def _unif(rng, b, lo, hi):
  return rng.uniform(lo, hi, size=(b, 1, 1)).astype(np.float32)


def _flag(rng, b, p):
  return rng.random((b, 1, 1)) < p


def _paint(c: np.ndarray, mask: np.ndarray, code) -> None:
  """c[mask] = code, where code may be per sprite ((b, 1, 1)) or a scalar."""
  np.copyto(c, np.asarray(code, np.int8), where=mask)


def _hsv(rng, b, h, s, v):
  """(b, 3) HSV colours drawn uniformly from the given ranges (hue wraps around 1)."""
  return np.stack([rng.uniform(*h, b) % 1.0, rng.uniform(*s, b), rng.uniform(*v, b)], -1)


def _any_hsv(rng, b, s=(0.45, 0.9), v=(0.55, 0.95)):
  return _hsv(rng, b, (0.0, 1.0), s, v)


# --- painters: (rng, b) -> (codes (b, 16, 16) int8, slot colours (b, 4, 3) HSV) ---------------


def _hero(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  hh, bh, lh = _ints(rng, b, 4, 5), _ints(rng, b, 3, 5), _ints(rng, b, 2, 4)
  hw, bw = _ints(rng, b, 2, 3), _ints(rng, b, 2, 3)  # head / body half widths
  y = _Y - (15 - (hh + bh + lh))  # row relative to the top of the head; feet on row 14
  head = (y >= 0) & (y < hh) & (_AX < hw)
  hair_rows = _ints(rng, b, 1, 2)
  hair = head & ((y < hair_rows) | (_flag(rng, b, 0.4) & (_AX >= hw - 1) & (y < hh - 1)))
  hair &= ~_flag(rng, b, 0.1)  # a few are bald
  torso = (y >= hh) & (y < hh + bh)
  body = torso & (_AX < bw)
  arms = torso & (_AX >= bw) & (_AX < bw + 1)
  robe = _flag(rng, b, 0.25)  # robed mages: no gap between the legs, tunic colour
  legs = (y >= hh + bh) & (y < hh + bh + lh) & (_AX < bw) & (robe | (_AX > 1))
  hat = _flag(rng, b, 0.35) & (15 - (hh + bh + lh) >= 3)  # brim row + crown row above the head
  hat = hat & (((y == -1) & (_AX < hw + 1)) | ((y == -2) & (_AX < hw - 1 + robe)))
  c[head] = _SLOT + 1
  c[hair | hat] = _SLOT + 2
  c[(y == hair_rows + 1) & (_AX == 1.5)] = _INK  # eyes
  c[body | arms] = _SLOT
  c[arms & (y == hh + bh - 1)] = _SLOT + 1  # hands
  c[body & (y == hh + bh - 1) & _flag(rng, b, 0.5)] = _SLOT + 3  # belt
  _paint(c, legs, np.where(robe, _SLOT, _SLOT + 3))
  c[legs & (y == hh + bh + lh - 1) & ~robe] = _INK  # shoes
  slots = np.stack(
    [
      _any_hsv(rng, b),  # tunic
      _hsv(rng, b, (0.03, 0.1), (0.25, 0.6), (0.45, 1.0)),  # skin
      _hsv(rng, b, (-0.05, 0.15), (0.3, 0.9), (0.2, 0.95)),  # hair: black, brown, red, blond
      _any_hsv(rng, b, (0.2, 0.6), (0.3, 0.6)),  # trousers / belt
    ],
    1,
  )
  return c, slots


def _slime(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  a, h, bottom = _unif(rng, b, 4.0, 6.9), _unif(rng, b, 4.5, 9.0), _ints(rng, b, 12, 14)
  body = (((_X - 7.5) / a) ** 2 + ((_Y - bottom - 0.5) / h) ** 2 < 1) & (_Y <= bottom)
  c[body] = _SLOT
  eye_y, eye_x = np.round(bottom - h * 0.45), np.where(a > 5, 2.5, 1.5)
  c[body & (_Y == eye_y) & (_AX == eye_x)] = _INK
  c[body & (_Y == eye_y - 1) & (_AX == eye_x) & _flag(rng, b, 0.7)] = _WHITE
  c[body & (_Y == eye_y + 1) & (_AX == 0.5) & _flag(rng, b, 0.5)] = _INK  # mouth
  hx, hy = np.round(7.5 - a * 0.55), np.round(bottom - h * 0.7)
  c[body & (_X == hx) & ((_Y == hy) | ((_Y == hy + 1) & (h > 5)))] = _WHITE  # shine
  c[body & (_Y == bottom) & _flag(rng, b, 0.4)] = _SLOT + 1  # darker goo at the base
  slots = _any_hsv(rng, b, (0.5, 0.95), (0.6, 0.95))
  return c, np.stack([slots, slots * [1, 1, 0.7], slots, slots], 1)


def _critter(rng, b):
  """Space-invader style creatures: a random mirrored bitmap with eyes."""
  c = np.zeros((b, SIZE, SIZE), np.int8)
  dens = np.linspace(0.8, 0.3, 6, dtype=np.float32)  # denser near the mirror axis
  half = rng.random((b, 12, 6), dtype=np.float32) < dens
  rows = np.arange(12)[None, :, None]
  half &= (rows >= rng.integers(0, 3, (b, 1, 1))) & (rows < rng.integers(8, 13, (b, 1, 1)))
  c[:, 2:14, 2:14] = np.concatenate([half[:, :, ::-1], half], 2) * _SLOT
  top = np.argmax(c.any(2), 1)[:, None, None]  # first painted row
  eye_y, eye_x = top + _ints(rng, b, 1, 3), np.where(_flag(rng, b, 0.5), 1.5, 2.5)
  c[(np.abs(_Y - eye_y) <= 1) & (_AX <= eye_x + 1)] = _SLOT  # solid face around the eyes
  _paint(c, (_Y == eye_y) & (_AX == eye_x), np.where(_flag(rng, b, 0.5), _INK, _WHITE))
  lower = (c == _SLOT) & (_Y > eye_y + 2) & _flag(rng, b, 0.6)
  c[lower] = _SLOT + 1  # second colour on the lower body
  return c, np.stack([_any_hsv(rng, b), _any_hsv(rng, b), _any_hsv(rng, b), _any_hsv(rng, b)], 1)


def _ghost(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  r, top, bottom = _unif(rng, b, 3.8, 6.0), _ints(rng, b, 1, 3), _ints(rng, b, 12, 14)
  cy = top + r - 0.5
  dome = ((_X - 7.5) ** 2 + (_Y - cy) ** 2 < r**2) & (_Y <= cy)
  skirt = (_Y > cy) & (_Y <= bottom) & (_AX < r)
  hem = (_Y == bottom) & ((((_AX - 0.5) // 2 + _ints(rng, b, 0, 1)) % 2) == 1)
  c[(dome | skirt) & ~hem] = _SLOT
  eye_y, eye_x = np.round(cy) - _ints(rng, b, 0, 1), _ints(rng, b, 1, 2) + 0.5
  eyes = ((_Y == eye_y) | (_Y == eye_y + 1)) & (_AX == eye_x)
  _paint(c, eyes, np.where(_flag(rng, b, 0.5), _INK, _WHITE))
  c[eyes & (_Y == eye_y + 1) & (c == _WHITE)] = _INK  # pupils in white eyes
  c[(_Y == eye_y + 3) & (_AX < 1) & _flag(rng, b, 0.5)] = _INK  # "o" mouth
  slots = _hsv(rng, b, (0, 1), (0.05, 0.45), (0.85, 1.0))
  return c, np.stack([slots] * 4, 1)


def _potion(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  bottom, kind = _ints(rng, b, 13, 14), _ints(rng, b, 0, 2)
  rad, wb = _unif(rng, b, 3.5, 5.5), _ints(rng, b, 3, 5)
  hb = _ints(rng, b, 5, 8)
  flask = (_X - 7.5) ** 2 + (_Y - (bottom + 0.5 - rad)) ** 2 < rad**2
  bottle = (_AX < wb) & (_Y > bottom - hb) & (_Y <= bottom)
  cone = (_Y > bottom - hb) & (_Y <= bottom) & (_AX < 1 + (_Y - bottom + hb) * 0.6)
  body = np.where(kind == 0, flask, np.where(kind == 1, bottle, cone))
  body_top = np.argmax(body.any(2), 1)[:, None, None]
  neck_w, neck_h, cork_h = _ints(rng, b, 1, 2), _ints(rng, b, 1, 2), _ints(rng, b, 1, 2)
  neck = (_AX < neck_w) & (_Y < body_top) & (_Y >= body_top - neck_h)
  cork = (_AX < neck_w) & (_Y < body_top - neck_h) & (_Y >= body_top - neck_h - cork_h)
  level = body_top + np.round((bottom - body_top) * _unif(rng, b, 0.15, 0.6))
  c[body | neck] = _SLOT + 1  # glass
  c[body & (_Y >= level)] = _SLOT  # liquid
  c[cork] = _SLOT + 2
  left = np.argmax(body[np.arange(b), np.minimum(body_top[:, 0, 0] + 2, 15)], 1)[:, None, None]
  c[body & (_X == left + 1) & (_Y >= body_top + 1) & (_Y <= body_top + 2)] = _WHITE  # shine
  bubbles = body & (_Y > level) & ((_X * 3 + _Y * 5 + _ints(rng, b, 0, 12)) % 13 == 0)
  c[bubbles & _flag(rng, b, 0.5)] = _SLOT + 3
  liquid = _any_hsv(rng, b, (0.6, 1.0), (0.6, 0.95))
  slots = np.stack(
    [
      liquid,
      _hsv(rng, b, (0.45, 0.65), (0.05, 0.25), (0.8, 0.95)),  # glass
      _hsv(rng, b, (0.05, 0.1), (0.4, 0.7), (0.45, 0.7)),  # cork
      liquid * [1, 0.5, 1] + [0, 0, 0.1],  # bubbles
    ],
    1,
  )
  return c, slots


def _sword(rng, b):
  """A diagonal sword (tip top right, or mirrored): blade, cross-guard, grip and pommel."""
  c = np.zeros((b, SIZE, SIZE), np.int8)
  d, s = _X + _Y - 15, _X - _Y  # offset across / position along the anti-diagonal
  width, tip, guard = _ints(rng, b, 1, 2), _ints(rng, b, 9, 12), _ints(rng, b, -6, -3)
  grip, guard_w = _ints(rng, b, 2, 4), _ints(rng, b, 2, 3)
  along = (d >= 0) & (d < width)
  blade = along & (s > guard + 1) & (s <= tip) & ((s < tip - 1) | (d == 0))
  cross = (s >= guard) & (s <= guard + 1) & (np.abs(d - (width - 1) / 2) <= guard_w)
  handle = (d == 0) & (s < guard) & (s >= guard - grip)
  pommel = (s < guard - grip) & (s >= guard - grip - 2) & (np.abs(d) <= 1)
  c[blade] = _SLOT
  c[blade & (d == 0) & (width == 2)] = _SLOT + 3  # fuller: a lighter line along the blade
  c[cross | pommel] = _SLOT + 1
  c[handle] = _SLOT + 2
  mirror = rng.random(b) < 0.5  # tip top left
  c[mirror] = c[mirror][:, :, ::-1]
  magic = _flag(rng, b, 0.25)[:, 0]
  steel = np.where(
    magic,
    _any_hsv(rng, b, (0.4, 0.8), (0.7, 1.0)),
    _hsv(rng, b, (0.5, 0.7), (0.03, 0.25), (0.7, 0.95)),
  )
  slots = np.stack(
    [
      steel,
      _hsv(rng, b, (0.06, 0.16), (0.45, 0.85), (0.5, 0.9)),  # gold / bronze
      _any_hsv(rng, b, (0.3, 0.7), (0.25, 0.5)),  # leather grip
      steel * [1, 0.5, 1] + [0, 0, 0.1],
    ],
    1,
  )
  return c, slots


def _gem(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  kind, r, cy = _ints(rng, b, 0, 2), _unif(rng, b, 4.0, 6.6), _unif(rng, b, 7.0, 8.0)
  dy = np.abs(_Y - cy)
  diamond = _AX + dy < r
  octagon = (_AX < r - 0.5) & (dy < r - 0.5) & (_AX + dy < r * 1.35)
  top = np.round(cy - r * 0.7)
  mid = top + _ints(rng, b, 2, 3)  # crown rows [top, mid), pavilion below
  brilliant = ((_Y >= top) & (_Y < mid) & (_AX < r - 1 - (mid - 1 - _Y))) | (
    (_Y >= mid) & (_AX < r * (top + 2 * r * 0.85 - _Y) / (top + 2 * r * 0.85 - mid))
  )
  body = np.where(kind == 0, diamond, np.where(kind == 1, octagon, brilliant))
  c[body] = _SLOT
  facet = body & (_Y < cy - 0.5) & (_AX < r * 0.45)
  c[facet] = _SLOT + 1
  c[body & (_Y >= cy + 0.5) & (_AX < r * 0.3)] = _SLOT + 2
  first = np.argmax(body.any(2), 1)[:, None, None]
  c[body & (_Y == first + 1) & (_X == 7.5 - r * 0.35 - 0.5) & _flag(rng, b, 0.7)] = _WHITE
  gem = _any_hsv(rng, b, (0.55, 1.0), (0.55, 0.9))
  return c, np.stack([gem, gem * [1, 0.45, 1] + [0, 0, 0.15], gem * [1, 1, 0.75], gem], 1)


def _mushroom(rng, b):
  c = np.zeros((b, SIZE, SIZE), np.int8)
  a, h, base = _unif(rng, b, 4.5, 6.9), _unif(rng, b, 3.0, 5.5), _ints(rng, b, 7, 10)
  bottom, stem_w = _ints(rng, b, 13, 14), _ints(rng, b, 1, 2)
  cap = (((_X - 7.5) / a) ** 2 + ((_Y - base - 0.5) / h) ** 2 < 1) & (_Y <= base)
  stem = (_Y > base) & (_Y <= bottom) & (_AX < stem_w + (_Y == bottom))
  c[stem] = _SLOT + 1
  c[cap] = _SLOT
  c[(_Y == base + 1) & (_AX < a - 1.5) & ~stem] = _SLOT + 2  # gills under the cap
  spots = np.zeros_like(cap)
  for _ in range(2):  # two mirrored spot pairs plus a centre spot
    sx, sy = _unif(rng, b, 0.5, a - 1.0), _unif(rng, b, base - h + 1.5, base - 0.5)
    spots |= (_AX - sx) ** 2 + (_Y - sy) ** 2 < _unif(rng, b, 0.3, 1.5)
  spots |= (_AX < 1) & (_Y == np.round(base - h * 0.7)) & _flag(rng, b, 0.6)
  c[cap & spots & _flag(rng, b, 0.85)] = _WHITE
  c[stem & (_Y == base + 3) & (_AX == 0.5 + stem_w - 1) & _flag(rng, b, 0.3)] = _INK  # cute eyes
  red = _hsv(rng, b, (-0.03, 0.03), (0.7, 0.95), (0.7, 0.95))
  cap_hsv = np.where(_flag(rng, b, 0.5)[:, 0], red, _any_hsv(rng, b, (0.4, 0.8), (0.4, 0.9)))
  cream = _hsv(rng, b, (0.08, 0.14), (0.1, 0.3), (0.8, 0.95))
  return c, np.stack([cap_hsv, cream, cream * [1, 1, 0.75], cap_hsv], 1)


_PAINTERS = (_hero, _slime, _critter, _ghost, _potion, _sword, _gem, _mushroom)


# --- shared finishing: jitter, outline, shading, palettes ------------------------------------


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """[..., 3] HSV in [0, 1] (hue wraps) -> uint8 RGB."""
  h, s, v = (hsv[..., i] for i in range(3))
  h = (h % 1.0) * 6
  s, v = np.clip(s, 0, 1), np.clip(v, 0, 1)
  i = np.floor(h).astype(int) % 6
  f = h - np.floor(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = np.stack(
    [np.stack(x, -1) for x in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
  )
  rgb = np.take_along_axis(table, i[None, ..., None], 0)[0]
  return np.round(rgb * 255).astype(np.uint8)


def _toward(h, target, amount):
  """Shifts hue h towards `target` by at most `amount` (the pixel artist's hue shift)."""
  return h + np.clip((target - h + 0.5) % 1.0 - 0.5, -amount, amount)


def _palettes(rng, slots: np.ndarray) -> np.ndarray:
  """Slot colours (b, 4, 3) HSV -> (b, 16, 3) uint8 palettes (see `_PALETTE_SIZE`)."""
  b = len(slots)
  h, s, v = slots[..., 0], slots[..., 1], slots[..., 2]
  dark = np.stack([_toward(h, 0.7, 0.04), np.minimum(s * 1.1 + 0.05, 1), v * 0.62], -1)
  light = np.stack([_toward(h, 0.15, 0.04), s * 0.7, np.minimum(v * 1.2 + 0.08, 1)], -1)
  shades = np.stack([dark, slots, light], 2).reshape(b, 3 * _NUM_SLOTS, 3)
  light_bg = _flag(rng, b, 0.5)[:, 0]
  bg = np.where(
    light_bg,
    _hsv(rng, b, (0, 1), (0.03, 0.15), (0.85, 0.97)),
    _hsv(rng, b, (0, 1), (0.15, 0.4), (0.1, 0.22)),
  )
  outline = np.where(
    _flag(rng, b, 0.6)[:, 0],
    np.stack([_toward(h[:, 0], 0.7, 0.05), np.full(b, 0.6), np.full(b, 0.16)], -1),
    np.tile([[0.7, 0.3, 0.08]], (b, 1)),
  )
  ink = np.tile([[0.72, 0.35, 0.1]], (b, 1))
  white = np.tile([[0.15, 0.05, 0.98]], (b, 1))
  hsv = np.concatenate([bg[:, None], outline[:, None], ink[:, None], shades, white[:, None]], 1)
  return _hsv_to_rgb(hsv)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """a[:, y - dy, x - dx] with zeros shifted in (so out[y, x] is the neighbour at (-dy, -dx))."""
  out = np.zeros_like(a)
  ys, yd = slice(max(-dy, 0), SIZE - max(dy, 0)), slice(max(dy, 0), SIZE - max(-dy, 0))
  xs, xd = slice(max(-dx, 0), SIZE - max(dx, 0)), slice(max(dx, 0), SIZE - max(-dx, 0))
  out[:, yd, xd] = a[:, ys, xs]
  return out


def _jitter(rng, codes: np.ndarray) -> np.ndarray:
  """Moves each sprite by up to one pixel in y and x where it stays clear of the border."""
  b = len(codes)
  rows, cols = codes.any(2), codes.any(1)
  first = lambda m: np.argmax(m, 1)
  last = lambda m: SIZE - 1 - np.argmax(m[:, ::-1], 1)
  out = codes
  for axis, m in ((1, rows), (2, cols)):
    lo, hi = np.maximum(-1, 1 - first(m)), np.minimum(1, SIZE - 2 - last(m))
    shift = np.clip(rng.integers(-1, 2, b), lo, np.maximum(hi, lo))
    for k in (-1, 1):
      sel = shift == k
      out[sel] = _shift(out[sel], k if axis == 1 else 0, k if axis == 2 else 0)
  return out


def _finish(rng, codes: np.ndarray) -> np.ndarray:
  """Paint codes -> palette indices: outline around the object, top-left light, bottom-right
  shadow on the colour slots."""
  obj = codes != _BG
  outside = lambda dy, dx: ~_shift(obj, dy, dx)  # the neighbour at (-dy, -dx) is background
  dark = outside(-1, 0) | outside(0, -1)  # background below or to the right
  light = (outside(1, 0) | outside(0, 1)) & ~dark  # background above or to the left
  shade = np.where(dark, 0, np.where(light, 2, 1)).astype(np.int8)
  slot = codes - _SLOT
  idx = np.where((slot >= 0) & (slot < _NUM_SLOTS), 3 + 3 * slot + shade, codes)
  idx = np.where(codes == _WHITE, _PALETTE_SIZE - 1, idx)
  grown = obj.copy()
  for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
    grown |= _shift(obj, dy, dx)
  return np.where(grown & ~obj, _OUTLINE, idx).astype(np.int8)


def generate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n sprites -> (images uint8 (n, 16, 16, 3), labels int32 (n,) indexing `CLASSES`).

  Deterministic in (n, seed); classes are balanced (counts differ by at most one).
  """
  rng = np.random.default_rng([seed % 2**63, 0x5B1])
  labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int32)
  images = np.empty((n, SIZE, SIZE, 3), np.uint8)
  for start in range(0, n, _CHUNK):
    lab = labels[start : start + _CHUNK]
    codes = np.zeros((len(lab), SIZE, SIZE), np.int8)
    slots = np.zeros((len(lab), _NUM_SLOTS, 3))
    for k, painter in enumerate(_PAINTERS):
      sel = np.nonzero(lab == k)[0]
      if len(sel):
        codes[sel], slots[sel] = painter(rng, len(sel))
    idx = _finish(rng, _jitter(rng, codes))
    pal = _palettes(rng, slots)
    images[start : start + len(lab)] = pal[np.arange(len(lab))[:, None, None], idx]
  return images, labels


def load_sprites(spec: DataSpec) -> Dataset:
  """spec.num_sprites sprites from spec.sprite_seed, labelled, at spec.image_size/channels.

  Pixel art: always resized nearest-neighbour, whatever spec.resize says.
  """
  images, labels = generate(int(spec.num_sprites), int(spec.sprite_seed))
  images = images_lib.conform_array(
    images, size=spec.image_size, channels=spec.channels, resize="nearest"
  )
  return Dataset(images, labels, len(CLASSES), CLASSES)


def grid(images: np.ndarray, columns: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
  """(n, h, w, c) uint8 -> one uint8 image: a `columns`-wide grid, upscaled (nearest)."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, im in enumerate(images):
    y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
    out[y : y + h, x : x + w] = im
  return out.repeat(scale, 0).repeat(scale, 1)


if __name__ == "__main__":
  import argparse
  import time

  from PIL import Image

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/sprites.png", help="where to write the 8x8 grid")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--time", type=int, default=100_000, help="sprites to time (0 = skip)")
  args = parser.parse_args()
  imgs, labs = generate(64, args.seed)
  Image.fromarray(grid(imgs[np.argsort(labs, kind="stable")])).save(args.out)
  print(f"wrote {args.out}")
  if args.time:
    t0 = time.perf_counter()
    generate(args.time, args.seed)
    print(f"generated {args.time} sprites in {time.perf_counter() - t0:.2f} s")
