"""Synthetic VQA in which the answer hinges on one small region among distractors, for lvr.py.

Each 48x48 RGB image (a 6x6 grid of 8x8 patches) holds six small objects, each inside its own patch (one of
4 shapes, 6 colours, 2 sizes, a random tint and position within the patch) over a noisy dark background.
Every question names one object by its colour. Its ROI is a chain of two boxes (x0, y0, x1, y1 in pixels, x1
and y1 exclusive), each an object's bounding box inside one of the 36 patches (the other objects distract):
first the named object, then the object the answer is read from (the same one for "shape"):

  shape        "what shape is the red object ?"               -> square|circle|triangle|cross  box: red, red
  near_shape   "what shape is nearest to the red object ?"    -> a shape                       box: red, neighbour
  near_color   "which color is nearest to the red object ?"   -> a colour                      box: red, neighbour

Colours are unique within an image, so a colour names one object; "nearest" is by patch-grid distance and
scenes where it is tied are redrawn. The "nearest" questions take two hops (find the named object, then its
nearest neighbour), one per box of the chain: reconstructing the first box's token (which carries its
position) is the first hop, reconstructing the second box's token from it the second, and the answer is then
read off that token. Scenes are drawn from a seed with numpy (vectorised over the batch; rendering loops over
the 6 object slots only) and rendered on the fly, so a 20k-scene training pool costs a few MB. Training and
held-out scenes come from different seed streams and any training scene equal to a held-out one is dropped, so
the two sets are disjoint. Only numpy, torch and the standard library are imported.
"""

import numpy as np
import torch

SPECIALS = ["<pad>", "<eos>", "<lvr_start>", "<lvr_end>"]
COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["square", "circle", "triangle", "cross"]
WORDS = ["what", "shape", "is", "the", "object", "?", "which", "color", "nearest", "to"]
POSITION_WORDS = [f"x{i}" for i in range(6)] + [f"y{i}" for i in range(6)]  # a patch's column and row, for hop_words
VOCAB = SPECIALS + COLORS + SHAPES + WORDS + POSITION_WORDS
STOI = {word: i for i, word in enumerate(VOCAB)}
PAD, EOS, LVR_START, LVR_END = (STOI[s] for s in SPECIALS)

QUESTION_TYPES = ("shape", "near_shape", "near_color")
TEMPLATES = {  # {c}: the named object's colour
    "shape": "what shape is the {c} object ?",
    "near_shape": "what shape is nearest to the {c} object ?",
    "near_color": "which color is nearest to the {c} object ?",
}
QUESTION_LEN = max(len(t.split()) for t in TEMPLATES.values())  # questions are right-padded with <pad>
ANSWER_LEN = 1

RGB = np.array([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.35, 0.95],
                [0.9, 0.85, 0.15], [0.85, 0.2, 0.85], [0.15, 0.85, 0.85]], dtype=np.float32)
N_OBJECTS, GRID, CELL, RADII = 6, 6, 8, np.array([2, 3])  # objects, 6x6 cells of 8 px (= patches), half-widths


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


def _draw(rng, n):
    """n scenes' parameters, unchecked (the named object's nearest neighbour may be tied)."""
    radius = RADII[rng.integers(0, 2, (n, N_OBJECTS))]                                # (n, 6)
    # centre inside the object's patch with the whole object inside it: [r, CELL-1-r]
    offset = radius[..., None] + np.floor(rng.random((n, N_OBJECTS, 2)) * (CELL - 2 * radius[..., None])).astype(int)
    cells = np.argsort(rng.random((n, GRID * GRID)), axis=1)[:, :N_OBJECTS]          # (n, 6) distinct patches
    return dict(cells=cells, colors=np.argsort(rng.random((n, len(COLORS))), axis=1)[:, :N_OBJECTS],
                shapes=rng.integers(0, len(SHAPES), (n, N_OBJECTS)), radius=radius,
                cx=(cells % GRID) * CELL + offset[..., 0], cy=(cells // GRID) * CELL + offset[..., 1],
                qtype=rng.integers(0, len(QUESTION_TYPES), n), target=rng.integers(0, N_OBJECTS, n),
                tint=rng.uniform(-0.1, 0.1, (n, N_OBJECTS, 3)).astype(np.float32))


def neighbour_distances(s):
    """Squared patch-grid distance (n, 6) of every object to the named one (inf for itself)."""
    rows, t = np.arange(len(s["qtype"])), s["target"]
    gx, gy = s["cells"] % GRID, s["cells"] // GRID
    dist = (gx - gx[rows, t][:, None]) ** 2 + (gy - gy[rows, t][:, None]) ** 2
    dist[rows, t] = np.iinfo(dist.dtype).max
    return dist


def sample_scenes(rng, n):
    """Scene and question parameters for n samples, as a dict of numpy arrays (vectorised); scenes whose
    named object has a tied nearest neighbour are redrawn."""
    parts, have = [], 0
    while have < n:
        s = _draw(rng, 2 * n)
        dist = np.sort(neighbour_distances(s), axis=1)
        s = take(s, dist[:, 0] < dist[:, 1])
        parts.append(s)
        have += len(s["qtype"])
    return take({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.arange(n))


def ask(s):
    """Questions (n, QUESTION_LEN), answers (n, 1) and ROI box chains (n, 2, 4) for scene parameters s:
    the named object's box, then the box of the object the answer is read from."""
    n, rows, t = len(s["qtype"]), np.arange(len(s["qtype"])), s["target"]
    near = neighbour_distances(s).argmin(1)                                           # (n,) nearest neighbour
    about = np.where(s["qtype"] == QUESTION_TYPES.index("shape"), t, near)           # (n,) the answer's object
    chain = np.stack([t, about], 1)                                                   # (n, 2) object slots
    r, cx, cy = (s[k][rows[:, None], chain] for k in ("radius", "cx", "cy"))         # (n, 2) each
    box = np.stack([cx - r, cy - r, cx + r + 1, cy + r + 1], -1)                      # (n, 2, 4), one patch each
    shape_word = np.array([STOI[w] for w in SHAPES])[s["shapes"][rows, about]]
    color_word = np.array([STOI[w] for w in COLORS])[s["colors"][rows, about]]
    answer = np.where(s["qtype"] == QUESTION_TYPES.index("near_color"), color_word, shape_word)[:, None]
    question = np.full((n, QUESTION_LEN), PAD)
    named = s["colors"][rows, t]                                                      # (n,) colour index
    for k, name in enumerate(QUESTION_TYPES):  # 3 types x 6 colours, vectorised within each
        for c, color in enumerate(COLORS):
            ids = [STOI[word] for word in TEMPLATES[name].format(c=color).split()]
            question[(s["qtype"] == k) & (named == c), :len(ids)] = ids
    return question, answer.astype(np.int64), box.astype(np.int64)


def hop_words(box, patch_object, patch_size=8):
    """(n, K, 4) ROI chains and (n, P) patch labels (patch_objects) -> (n, 4K) long, on box's device: per box, what
    its visual token is trained to encode (the position code and stage 0's object head), as words: its patch's column
    and row, the colour and shape of the object there ("x3 y1 red circle"); the chain-of-thought targets of lvr.py."""
    box, patch_object = torch.as_tensor(box), torch.as_tensor(patch_object)
    w = 48 // patch_size
    column = (box[..., 0] + box[..., 2] - 1) // 2 // patch_size                      # (n, K), x1 exclusive
    row = (box[..., 1] + box[..., 3] - 1) // 2 // patch_size
    label = patch_object.gather(1, row * w + column) - 1                              # (n, K): colour·4 + shape
    if bool((label < 0).any()):
        raise ValueError("a ROI box's patch holds no object")
    xs, ys = (torch.tensor([STOI[f"{axis}{i}"] for i in range(w)], device=box.device) for axis in "xy")
    colors, shapes = (torch.tensor([STOI[word] for word in words], device=box.device) for words in (COLORS, SHAPES))
    return torch.stack([xs[column], ys[row], colors[label // len(SHAPES)], shapes[label % len(SHAPES)]], -1).flatten(1)


def render(s, rng):
    """Images (n, 3, 48, 48) float32 in [0, 1] for scene parameters s; rng draws the pixel noise."""
    n, rows = len(s["qtype"]), np.arange(len(s["qtype"]))[:, None, None]
    noise = rng.standard_normal((n, 48, 48, 3), dtype=np.float32) * 0.03
    image = np.full((n, 48, 48, 3), 0.05, dtype=np.float32)                        # dark background
    d = np.arange(-3, 4)
    dy, dx = d[None, :, None], d[None, None, :]                                     # 7x7 window offsets
    for k in range(N_OBJECTS):  # loop over object slots, vectorised over the batch
        r = s["radius"][:, k][:, None, None]
        masks = np.stack([(abs(dx) <= r) & (abs(dy) <= r),                             # square
                          dx ** 2 + dy ** 2 <= r ** 2 + r,                              # circle
                          (abs(dy) <= r) & (2 * abs(dx) <= dy + r),                     # triangle
                          ((dx == 0) | (dy == 0)) & (abs(dx) <= r) & (abs(dy) <= r)])   # cross
        mask = masks[s["shapes"][:, k], np.arange(n)]                                   # (n, 7, 7)
        ys, xs = s["cy"][:, k][:, None, None] + dy, s["cx"][:, k][:, None, None] + dx
        ys, xs = np.broadcast_to(ys, mask.shape), np.broadcast_to(xs, mask.shape)
        color = np.clip(RGB[s["colors"][:, k]] + s["tint"][:, k], 0, 1)                 # (n, 3)
        b = np.broadcast_to(rows, mask.shape)
        image[b[mask], ys[mask], xs[mask]] = np.broadcast_to(color[:, None, None], (*mask.shape, 3))[mask]
    image += noise
    return np.clip(image, 0, 1, out=image).transpose(0, 3, 1, 2)


def scene_keys(s):
    """One hashable key per sample (scene + question), to keep train and test disjoint."""
    fields = [s[k].reshape(len(s["qtype"]), -1).astype(np.int64) for k in
              ("cells", "colors", "shapes", "radius", "cx", "cy", "qtype", "target")]
    return [row.tobytes() for row in np.concatenate(fields, 1)]


def take(s, idx):
    return {k: v[idx] for k, v in s.items()}


def patch_objects(s, patch_size):
    """(n, P) long: per patch of the row-major grid, 0 for background or 1 + colour·4 + shape of the object
    whose centre lies in it (the labels a pretrained encoder's patch tokens would know)."""
    w, rows = 48 // patch_size, np.arange(len(s["qtype"]))[:, None]
    labels = np.zeros((len(s["qtype"]), w * w), dtype=np.int64)
    labels[rows, (s["cy"] // patch_size) * w + s["cx"] // patch_size] = 1 + s["colors"] * len(SHAPES) + s["shapes"]
    return labels


def make_batch(s, rng, patch_size=8):
    question, answer, box = ask(s)
    return {"image": torch.from_numpy(np.ascontiguousarray(render(s, rng))),
            "question": torch.from_numpy(question).long(), "answer": torch.from_numpy(answer).long(),
            "box": torch.from_numpy(box).long(), "qtype": torch.from_numpy(s["qtype"]).long(),
            "patch_object": torch.from_numpy(patch_objects(s, patch_size))}


class VQATask:
    """Task object for train.py: name, train_batch(step, batch_size), test_sets, plus the vocabulary and
    geometry the model needs. Batches: image float (B, 3, 48, 48), question long (B, QUESTION_LEN),
    answer long (B, 1), box long (B, 2, 4) pixels (the ROI chain, ask), qtype long (B,), patch_object long (B, P)
    (patch_objects)."""
    name = "vqa"
    vocab, stoi, vocab_size = VOCAB, STOI, len(VOCAB)
    pad_id, eos_id, lvr_start_id, lvr_end_id = PAD, EOS, LVR_START, LVR_END
    image_size, patch_size, question_len, answer_len = 48, 8, QUESTION_LEN, ANSWER_LEN
    question_types = QUESTION_TYPES
    hop_len = 8  # hop_words of the two-box chain
    patch_classes = 1 + len(COLORS) * len(SHAPES)  # background + colour x shape (patch_objects)

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
        self.test_sets = {"held-out": make_batch(test, np.random.default_rng([seed, 3]), patch_size)}
        self.fresh_stream, self._seen = None, None

    def train_on_fresh_scenes(self):
        """From now on train_batch draws scenes outside the training pool and the held-out set (lvr's RL stage
        trains on questions its SFT stage never saw)."""
        self.fresh_stream = 5

    def fresh_batch(self, stream, index, batch_size):
        """Deterministic in (seed, stream, index): new scenes, none in the training pool or the held-out set
        (stream 5: fresh training scenes, stream 6: the validation questions)."""
        if self._seen is None:
            self._seen = set(scene_keys(self.train_scenes)) | set(scene_keys(sample_scenes(
                np.random.default_rng([self.seed, 2]), len(self.test_sets["held-out"]["answer"]))))
        rng, parts, have = np.random.default_rng([self.seed, stream, index]), [], 0
        while have < batch_size:
            s = sample_scenes(rng, batch_size)
            s = take(s, np.array([k not in self._seen for k in scene_keys(s)]))
            parts.append(s)
            have += len(s["qtype"])
        scenes = take({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.arange(batch_size))
        return make_batch(scenes, rng, self.patch_size)

    def train_batch(self, step, batch_size):
        """Deterministic in (seed, step): scenes drawn from the training pool (or fresh ones, see
        train_on_fresh_scenes), fresh pixel noise."""
        if self.fresh_stream is not None:
            return self.fresh_batch(self.fresh_stream, step, batch_size)
        rng = np.random.default_rng([self.seed, 4, step])
        idx = rng.integers(0, len(self.train_scenes["qtype"]), batch_size)
        return make_batch(take(self.train_scenes, idx), rng, self.patch_size)

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
              "boxes", batch["box"][i].tolist(), "patches",
              [roi_patch_indices(box, task.image_size, task.patch_size) for box in batch["box"][i].tolist()])
