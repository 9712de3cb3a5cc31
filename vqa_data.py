"""Synthetic perception-heavy VQA with region boxes, for Latent Visual Reasoning (lvr.py).

Each 48x48 RGB image holds six small objects (one of 4 shapes, 6 colours, 2 sizes, some with a one-pixel
dark dot at the centre) and one tiny white sign showing a 3x5-pixel digit, each in its own cell of a 4x4
grid, over a noisy dark background. Every question hinges on one small region, given as the ROI box
(x0, y0, x1, y1) in pixels (x1, y1 exclusive), the way Visual-CoT boxes supervise LVR:

  shape    "what shape is the red object ?"                 -> square|circle|triangle|cross   box: that object
  dot      "does the red object have a dot ?"               -> yes|no                         box: that object
  nearest  "which color is nearest to the red object ?"     -> a colour                       box: the neighbour
  bigger   "is the red object bigger than its neighbour ?"  -> yes|no       box: union of both objects' boxes
  count    "how many objects in the top left ?"             -> 0..4                           box: the quadrant
  digit    "what digit is on the sign ?"                    -> 0..9                           box: the sign

Colours are unique within an image, so a colour names one object. Scenes are drawn from a seed with
numpy (vectorised over the batch; rendering loops over the 7 object slots only) and rendered on the fly,
so a 20k-scene training pool costs a few MB. Training and held-out scenes come from different seed
streams and any training scene equal to a held-out one is dropped, so the two sets are disjoint.
Only numpy, torch and the standard library are imported (no project file).
"""

import numpy as np
import torch

SPECIALS = ["<pad>", "<eos>", "<lvr_start>", "<lvr_end>"]
COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["square", "circle", "triangle", "cross"]
DIGITS = [str(d) for d in range(10)]
WORDS = ["what", "shape", "is", "the", "object", "does", "have", "a", "dot", "?", "which", "color", "nearest",
         "to", "bigger", "than", "its", "neighbour", "how", "many", "objects", "in", "top", "bottom", "left",
         "right", "digit", "on", "sign", "yes", "no"]
VOCAB = SPECIALS + COLORS + SHAPES + DIGITS + WORDS
STOI = {word: i for i, word in enumerate(VOCAB)}
PAD, EOS, LVR_START, LVR_END = (STOI[s] for s in SPECIALS)

QUESTION_TYPES = ("shape", "dot", "nearest", "bigger", "count", "digit")
TEMPLATES = {  # {c}: the target object's colour, {v} {h}: a quadrant
    "shape": "what shape is the {c} object ?",
    "dot": "does the {c} object have a dot ?",
    "nearest": "which color is nearest to the {c} object ?",
    "bigger": "is the {c} object bigger than its neighbour ?",
    "count": "how many objects in the {v} {h} ?",
    "digit": "what digit is on the sign ?",
}
QUESTION_LEN = max(len(t.split()) for t in TEMPLATES.values())  # questions are right-padded with <pad>
ANSWER_LEN = 1

RGB = np.array([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.35, 0.95],
                [0.9, 0.85, 0.15], [0.85, 0.2, 0.85], [0.15, 0.85, 0.85]], dtype=np.float32)
GLYPHS = np.array([[int(c) for c in row] for row in (  # 3x5 digit font, rows top to bottom
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001001010010", "111101111101111", "111101111001111")],
    dtype=bool).reshape(10, 5, 3)
N_OBJECTS, GRID, RADII = 6, 4, np.array([2, 4])  # objects per image, 4x4 cells, small/large half-width
SIGN_W, SIGN_H = 5, 7


def roi_patch_mask(boxes, image_size, patch_size):
    """(B, 4) pixel boxes (x0, y0, x1, y1; x1, y1 exclusive) -> (B, w*w) bool, True for every patch of the
    row-major patch grid that the box touches: x0 = floor(x0/p) clamped to [0, w-1], x1 = ceil(x1/p)
    clamped to [0, w] (same for y), index = y*w + x."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    x0, y0, x1, y1 = boxes.unbind(1)
    if bool(((x1 <= x0) | (y1 <= y0)).any()):
        raise ValueError("degenerate box: need x1 > x0 and y1 > y0")
    if bool(((x1 <= 0) | (y1 <= 0) | (x0 >= image_size) | (y0 >= image_size)).any()):
        raise ValueError("box lies outside the image")
    w = image_size // patch_size
    gx0 = torch.floor(x0 / patch_size).clamp(0, w - 1)[:, None]  # (B, 1)
    gy0 = torch.floor(y0 / patch_size).clamp(0, w - 1)[:, None]
    gx1 = torch.ceil(x1 / patch_size).clamp(0, w)[:, None]
    gy1 = torch.ceil(y1 / patch_size).clamp(0, w)[:, None]
    grid = torch.arange(w, dtype=torch.float64)[None]                      # (1, w)
    in_x = (grid >= gx0) & (grid < gx1)                                    # (B, w)
    in_y = (grid >= gy0) & (grid < gy1)                                    # (B, w)
    return (in_y[:, :, None] & in_x[:, None, :]).reshape(len(boxes), w * w)  # (B, w*w), index = y*w + x


def roi_patch_indices(box, image_size, patch_size):
    """Indices (ascending, row-major) of the grid patches one pixel box touches."""
    return roi_patch_mask([list(box)], image_size, patch_size)[0].nonzero().flatten().tolist()


def sample_scenes(rng, n):
    """Scene and question parameters for n samples, as a dict of numpy arrays (vectorised)."""
    cells = np.argsort(rng.random((n, GRID * GRID)), axis=1)[:, :N_OBJECTS + 1]    # (n, 7) distinct cells
    cell = 48 // GRID
    colors = np.argsort(rng.random((n, len(COLORS))), axis=1)[:, :N_OBJECTS]       # (n, 6) unique colours
    radius = RADII[rng.integers(0, 2, (n, N_OBJECTS))]                              # (n, 6)
    # centre inside the object's cell with a margin of r+1 pixels
    span = (cell - 2 * radius - 1)[..., None]                                      # (n, 6, 1) free positions
    offset = (radius[..., None] + 1 + np.floor(rng.random((n, N_OBJECTS, 2)) * span)).astype(int)  # (n, 6, 2)
    cx = (cells[:, :N_OBJECTS] % GRID) * cell + offset[..., 0]          # (n, 6)
    cy = (cells[:, :N_OBJECTS] // GRID) * cell + offset[..., 1]
    sign_x = (cells[:, -1] % GRID) * cell + rng.integers(1, cell - SIGN_W, n)      # (n,)
    sign_y = (cells[:, -1] // GRID) * cell + rng.integers(1, cell - SIGN_H, n)
    return dict(cells=cells, colors=colors, shapes=rng.integers(0, len(SHAPES), (n, N_OBJECTS)), radius=radius,
                cx=cx, cy=cy, dot=rng.random((n, N_OBJECTS)) < 0.5, digit=rng.integers(0, 10, n),
                sign_x=sign_x, sign_y=sign_y, qtype=rng.integers(0, len(QUESTION_TYPES), n),
                target=rng.integers(0, N_OBJECTS, n), quadrant=rng.integers(0, 4, n),
                tint=rng.uniform(-0.1, 0.1, (n, N_OBJECTS, 3)).astype(np.float32))


def ask(s):
    """Questions (n, QUESTION_LEN), answers (n, 1) and ROI boxes (n, 4) for scene parameters s."""
    n, rows = len(s["qtype"]), np.arange(len(s["qtype"]))
    t = s["target"]
    boxes = np.stack([s["cx"] - s["radius"], s["cy"] - s["radius"],
                      s["cx"] + s["radius"] + 1, s["cy"] + s["radius"] + 1], -1)    # (n, 6, 4) object boxes
    dist = np.hypot(s["cx"] - s["cx"][rows, t][:, None], s["cy"] - s["cy"][rows, t][:, None])
    dist[rows, t] = np.inf
    near = dist.argmin(1)                                                           # (n,) nearest neighbour
    quad_x, quad_y = s["quadrant"] % 2, s["quadrant"] // 2
    in_quad = ((s["cells"][:, :N_OBJECTS] % GRID) // 2 == quad_x[:, None]) & \
              ((s["cells"][:, :N_OBJECTS] // GRID) // 2 == quad_y[:, None])
    union = np.concatenate([np.minimum(boxes[rows, t, :2], boxes[rows, near, :2]),
                            np.maximum(boxes[rows, t, 2:], boxes[rows, near, 2:])], -1)
    quad_box = np.stack([quad_x * 24, quad_y * 24, quad_x * 24 + 24, quad_y * 24 + 24], -1)
    sign_box = np.stack([s["sign_x"], s["sign_y"], s["sign_x"] + SIGN_W, s["sign_y"] + SIGN_H], -1)
    answers = {  # word of the answer per question type, (n,) each
        "shape": np.array(SHAPES)[s["shapes"][rows, t]],
        "dot": np.where(s["dot"][rows, t], "yes", "no"),
        "nearest": np.array(COLORS)[s["colors"][rows, near]],
        "bigger": np.where(s["radius"][rows, t] > s["radius"][rows, near], "yes", "no"),
        "count": np.array(DIGITS)[in_quad.sum(1)],
        "digit": np.array(DIGITS)[s["digit"]],
    }
    roi = {"shape": boxes[rows, t], "dot": boxes[rows, t], "nearest": boxes[rows, near], "bigger": union,
           "count": quad_box, "digit": sign_box}
    question = np.full((n, QUESTION_LEN), PAD)
    answer, box = np.zeros((n, ANSWER_LEN), dtype=np.int64), np.zeros((n, 4), dtype=np.int64)
    target_color = np.array(COLORS)[s["colors"][rows, t]]
    for k, name in enumerate(QUESTION_TYPES):  # loop over 6 question types, vectorised within each
        sel = s["qtype"] == k
        for v, h in ((0, 0), (0, 1), (1, 0), (1, 1)) if name == "count" else ((None, None),):
            part = sel & ((quad_y == v) & (quad_x == h) if name == "count" else True)
            for color in COLORS if "{c}" in TEMPLATES[name] else (None,):
                rows_here = part & (target_color == color) if color else part
                text = TEMPLATES[name].format(c=color, v=("top", "bottom")[v or 0], h=("left", "right")[h or 0])
                ids = [STOI[word] for word in text.split()]
                question[rows_here, :len(ids)] = ids
        answer[sel, 0] = [STOI[word] for word in answers[name][sel]]
        box[sel] = roi[name][sel]
    return question, answer, box


def render(s, rng):
    """Images (n, 3, 48, 48) float32 in [0, 1] for scene parameters s; rng draws the pixel noise."""
    n, rows = len(s["qtype"]), np.arange(len(s["qtype"]))[:, None, None]
    noise = rng.standard_normal((n, 48, 48, 3), dtype=np.float32) * 0.03
    image = np.full((n, 48, 48, 3), 0.05, dtype=np.float32)                        # dark background
    d = np.arange(-4, 5)
    dy, dx = d[None, :, None], d[None, None, :]                                     # 9x9 window offsets
    for k in range(N_OBJECTS):  # loop over object slots, vectorised over the batch
        r = s["radius"][:, k][:, None, None]
        masks = np.stack([(abs(dx) <= r) & (abs(dy) <= r),                             # square
                          dx ** 2 + dy ** 2 <= r ** 2 + r,                              # circle
                          (abs(dy) <= r) & (2 * abs(dx) <= dy + r),                     # triangle
                          ((dx == 0) | (dy == 0)) & (abs(dx) <= r) & (abs(dy) <= r)])   # cross
        mask = masks[s["shapes"][:, k], np.arange(n)]                                   # (n, 9, 9)
        ys, xs = s["cy"][:, k][:, None, None] + dy, s["cx"][:, k][:, None, None] + dx
        ys, xs = np.broadcast_to(ys, mask.shape), np.broadcast_to(xs, mask.shape)
        color = np.clip(RGB[s["colors"][:, k]] + s["tint"][:, k], 0, 1)                 # (n, 3)
        b = np.broadcast_to(rows, mask.shape)
        image[b[mask], ys[mask], xs[mask]] = np.broadcast_to(color[:, None, None], (*mask.shape, 3))[mask]
        dotted = s["dot"][:, k]
        image[dotted.nonzero()[0], s["cy"][dotted, k], s["cx"][dotted, k]] = 0.05
    sy = s["sign_y"][:, None, None] + np.arange(SIGN_H)[None, :, None]
    sx = s["sign_x"][:, None, None] + np.arange(SIGN_W)[None, None, :]
    image[rows, sy, sx] = 0.95                                                      # white sign
    glyph = GLYPHS[s["digit"]]                                                      # (n, 5, 3)
    gy = np.broadcast_to(s["sign_y"][:, None, None] + 1 + np.arange(5)[None, :, None], glyph.shape)
    gx = np.broadcast_to(s["sign_x"][:, None, None] + 1 + np.arange(3)[None, None, :], glyph.shape)
    image[np.broadcast_to(rows, glyph.shape)[glyph], gy[glyph], gx[glyph]] = 0.05     # dark digit strokes
    image += noise
    return np.clip(image, 0, 1, out=image).transpose(0, 3, 1, 2)


def scene_keys(s):
    """One hashable key per sample (scene + question), to keep train and test disjoint."""
    fields = [s[k].reshape(len(s["qtype"]), -1).astype(np.int64) for k in
              ("cells", "colors", "shapes", "radius", "cx", "cy", "dot", "digit", "sign_x", "sign_y", "qtype",
               "target", "quadrant")]
    return [row.tobytes() for row in np.concatenate(fields, 1)]


def take(s, idx):
    return {k: v[idx] for k, v in s.items()}


def make_batch(s, rng):
    question, answer, box = ask(s)
    return {"image": torch.from_numpy(np.ascontiguousarray(render(s, rng))),
            "question": torch.from_numpy(question).long(), "answer": torch.from_numpy(answer).long(),
            "box": torch.from_numpy(box).long(), "qtype": torch.from_numpy(s["qtype"]).long()}


class VQATask:
    """Task object for train.py: name, train_batch(step, batch_size), test_sets, plus the vocabulary and
    geometry the model needs. Batches: image float (B, 3, 48, 48), question long (B, QUESTION_LEN),
    answer long (B, 1), box long (B, 4) pixels, qtype long (B,)."""
    name = "vqa"
    vocab, stoi, vocab_size = VOCAB, STOI, len(VOCAB)
    pad_id, eos_id, lvr_start_id, lvr_end_id = PAD, EOS, LVR_START, LVR_END
    image_size, patch_size, question_len, answer_len = 48, 8, QUESTION_LEN, ANSWER_LEN
    question_types = QUESTION_TYPES

    def __init__(self, seed=0, train_size=20000, eval_size=500, patch_size=8):
        if train_size < 1 or eval_size < 1:
            raise ValueError(f"train_size and eval_size must be positive, got {train_size}, {eval_size}")
        if 48 % patch_size:
            raise ValueError(f"patch_size must divide the image size 48, got {patch_size}")
        self.seed, self.patch_size = seed, patch_size
        test = sample_scenes(np.random.default_rng([seed, 2]), eval_size)
        train = sample_scenes(np.random.default_rng([seed, 1]), train_size)
        held_out = set(scene_keys(test))
        self.train_scenes = take(train, np.array([k not in held_out for k in scene_keys(train)]))
        self.test_sets = {"held-out": make_batch(test, np.random.default_rng([seed, 3]))}

    def train_batch(self, step, batch_size):
        """Deterministic in (seed, step): scenes drawn from the training pool, fresh pixel noise."""
        rng = np.random.default_rng([self.seed, 4, step])
        idx = rng.integers(0, len(self.train_scenes["qtype"]), batch_size)
        return make_batch(take(self.train_scenes, idx), rng)

    def prior_accuracy(self):
        """Held-out accuracy (percent) of answering each question type with its most frequent training answer."""
        train_answer = ask(self.train_scenes)[1][:, 0]
        test, correct = self.test_sets["held-out"], 0
        for k in range(len(QUESTION_TYPES)):
            majority = np.bincount(train_answer[self.train_scenes["qtype"] == k], minlength=len(VOCAB)).argmax()
            correct += int((test["answer"][test["qtype"] == k, 0] == int(majority)).sum())
        return 100.0 * correct / len(test["answer"])

    def decode(self, ids):
        return " ".join(VOCAB[i] for i in ids)


if __name__ == "__main__":
    import time
    start = time.perf_counter()
    task = VQATask(seed=0, train_size=10000, eval_size=500)
    batch = task.train_batch(0, 10000)
    print(f"10k training samples generated and rendered in {time.perf_counter() - start:.2f} s")
    for i in range(4):
        print(task.decode(batch["question"][i].tolist()), "->", task.decode(batch["answer"][i].tolist()),
              "box", batch["box"][i].tolist(), "patches",
              roi_patch_indices(batch["box"][i].tolist(), task.image_size, task.patch_size))
