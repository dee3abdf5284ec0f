"""Input pipeline: random-access sources -> per-process numpy batches -> global sharded arrays.

Training batches are a pure function of (seed, step): slot j of the global batch at step s is
fixed by the mixture proportions and a per-epoch permutation of each dataset, and its augmentation
is keyed by (seed, s, j). Each process decodes only the slots that live on its own devices, so a
resumed run, or a run on another number of processes, sees exactly the same global batches.

Evaluation visits every example once in fixed order: each process takes a contiguous shard of the
split, all processes run the same number of batches, and padding rows carry `valid = 0`.
"""
from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import functools
from typing import Iterator, Sequence

import cv2
import numpy as np

from jaxseg import preprocess, resolution, sharding
from jaxseg.mixture import mixture_counts

# Ids travel inside batches as fixed-width uint8 rows, so they gather like numbers; 255 bytes hold
# any file name (person_folder ids are photo stems).
ID_BYTES = 255


@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, dataset: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, dataset, epoch]).permutation(n)


def encode_id(example_id: str) -> np.ndarray:
    """Fixed-width uint8 row for an id (utf-8, zero padded)."""
    raw = example_id.encode("utf-8")
    if len(raw) > ID_BYTES:
        raise ValueError(f"example id longer than {ID_BYTES} bytes: {example_id!r}")
    return np.frombuffer(raw.ljust(ID_BYTES, b"\0"), np.uint8)


def decode_id(row: np.ndarray) -> str:
    """Inverse of encode_id."""
    return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8")


class TrainBatches:
    """Endless training batches of this process's slots, starting at `start_step`."""

    def __init__(self, sources: Sequence, weights: Sequence[float], *, global_batch: int,
                 image_size: int, aug, seed: int, start_step: int = 0,
                 slots: slice | None = None, num_workers: int = 2, prefetch: int = 2):
        self.sources = list(sources)
        for src in self.sources:
            if len(src) == 0:
                raise ValueError(f"training source {src!r} has no examples")
        self.counts = mixture_counts(weights, global_batch)
        self.global_batch = global_batch
        self.image_size = image_size
        self.aug = aug
        self.seed = seed
        self.step = start_step
        self.slots = slots or slice(0, global_batch)
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
        self._pending: collections.deque = collections.deque()

    def example_at(self, step: int, slot: int) -> tuple[int, int]:
        """(dataset number, example index) that fills `slot` of the global batch at `step`."""
        offset = 0
        for d, n_d in enumerate(self.counts):
            if slot < offset + n_d:
                position = step * n_d + (slot - offset)
                size = len(self.sources[d])
                epoch, within = divmod(position, size)
                return d, int(_epoch_permutation(self.seed, d, epoch, size)[within])
            offset += n_d
        raise IndexError(f"slot {slot} outside a batch of {self.global_batch}")

    def _load(self, step: int, slot: int):
        d, i = self.example_at(step, slot)
        return preprocess.train_example(self.sources[d][i], self.image_size, self.aug,
                                        self.seed, step, slot)

    def _submit(self, step: int):
        slots = range(self.slots.start, self.slots.stop)
        return [self._pool.submit(self._load, step, j) for j in slots]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._pending) < self.prefetch + 1:
            self._pending.append(self._submit(self.step + len(self._pending)))
        futures = self._pending.popleft()
        self.step += 1
        images, masks = zip(*(f.result() for f in futures))
        return {"image": np.stack(images), "mask": np.stack(masks),
                "valid": np.ones(len(images), np.float32)}

    def close(self):
        """Stops the worker threads (pending work is dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Head(collections.abc.Sequence):
    """The first `n` examples of a source (all of them when n <= 0)."""

    def __init__(self, source, n: int):
        self.source = source
        self.n = len(source) if n <= 0 else min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def example_sizes(source) -> np.ndarray:
    """(N, 2) heights and widths of every example of a source (reads each once)."""
    return np.array([source[i]["image"].shape[:2] for i in range(len(source))], np.int32)


# Hand-made masks carry specks of a few pixels beside the person; a region must cover at least
# this fraction of the image to count as a person.
MIN_REGION_FRACTION = 0.001


def count_regions(mask: np.ndarray) -> int:
    """8-connected person regions of at least MIN_REGION_FRACTION of the image."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    min_area = max(1, MIN_REGION_FRACTION * mask.shape[0] * mask.shape[1])
    return int(np.sum(stats[1:n, cv2.CC_STAT_AREA] >= min_area))


def process_shard(n: int, process_index: int, process_count: int) -> range:
    """Contiguous, near-equal share of n examples for one process."""
    per = -(-n // process_count)
    return range(min(n, process_index * per), min(n, (process_index + 1) * per))


class EvalBatches:
    """One pass over a source in fixed order, padded, the same batch count on every process.

    Each local batch has: image (b,S,S,3) and mask (b,S,S,1) at model resolution; full_mask
    (b,H,W) on the canvas at original resolution (and full_image (b,H,W,3) from
    `iterate(full_image=True)`); size (b,2) original (height, width); valid (b,); regions (b,)
    person regions in the ground truth (count_regions); id (b, ID_BYTES) uint8; index (b,) the
    example's position in the source (-1 for padding).
    """

    def __init__(self, source, *, local_batch: int, image_size: int,
                 canvas: tuple[int, int], process_index: int = 0, process_count: int = 1,
                 num_workers: int = 2):
        self.source = source
        self.image_size = image_size
        self.canvas = canvas
        self.local_batch = local_batch
        self.indices = process_shard(len(source), process_index, process_count)
        per_process = -(-len(source) // process_count)
        self.num_batches = max(1, -(-per_process // local_batch))
        self.num_workers = num_workers

    def _example(self, i: int | None, full_image: bool) -> dict:
        s, c = self.image_size, self.canvas
        if i is None:
            row = {"image": np.zeros((s, s, 3), np.uint8), "mask": np.zeros((s, s, 1), np.uint8),
                   "full_mask": np.zeros(c, np.uint8), "size": np.zeros(2, np.int32),
                   "valid": 0.0, "regions": 0, "id": np.zeros(ID_BYTES, np.uint8), "index": -1}
            if full_image:
                row["full_image"] = np.zeros((*c, 3), np.uint8)
            return row
        ex = self.source[i]
        image, mask = preprocess.model_input(ex, s)
        full = ex["mask"][..., 0]
        row = {"image": image, "mask": mask, "full_mask": resolution.pad_to_canvas(full, c),
               "size": np.array(full.shape, np.int32), "valid": 1.0,
               "regions": count_regions(full), "id": encode_id(ex["id"]), "index": i}
        if full_image:
            row["full_image"] = resolution.pad_to_canvas(ex["image"], c)
        return row

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return self.iterate()

    def iterate(self, *, full_image: bool = False) -> Iterator[dict]:
        """The batches; with `full_image`, also the photos on the canvas (megabytes per image,
        so only for consumers that read them: refinement)."""
        order = list(self.indices)
        order += [None] * (self.num_batches * self.local_batch - len(order))
        with concurrent.futures.ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            for b in range(self.num_batches):
                chunk = order[b * self.local_batch:(b + 1) * self.local_batch]
                rows = list(pool.map(lambda i: self._example(i, full_image), chunk))
                batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
                batch["valid"] = batch["valid"].astype(np.float32)
                batch["regions"] = batch["regions"].astype(np.int32)
                batch["index"] = batch["index"].astype(np.int32)
                yield batch


def prefetch_to_mesh(batches, mesh, size: int = 2) -> Iterator[dict]:
    """Turns local numpy batches into global arrays on the mesh, `size` batches ahead."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(sharding.to_global(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
