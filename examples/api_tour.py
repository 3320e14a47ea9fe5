"""A tour of the public API on real photographs.

    python examples/api_tour.py CHECKPOINT [IMAGE_DIR]

CHECKPOINT is an official CVNet file (e.g. CVPR2022_CVNet_R50.pyth) or a directory written
by `python -m scvnet_jax.convert`; IMAGE_DIR holds .jpg files (default: the minirevisit
photos in ../shared). Prints what each call returns.
"""
import sys
from pathlib import Path

import cv2
import numpy as np

import scvnet_jax as sj

checkpoint = sys.argv[1]
image_dir = Path(sys.argv[2] if len(sys.argv) > 2 else
                 Path(__file__).resolve().parents[2] / "shared/minirevisit/roxford5k/jpg")

model = sj.load(checkpoint)  # depth read from the file; torch is not needed
print(model)

# Four photos, BGR as cv2 reads them, resized to one size so they form a batch.
paths = sorted(image_dir.glob("*.jpg"))[:4]
images = sj.data.normalize(np.stack([cv2.resize(cv2.imread(str(p)), (320, 240))
                                     for p in paths]))           # (4, 240, 320, 3) float32

d = model.global_descriptor(images)                 # CVNet-Global, L2-normalised
f = model.local_features(images)                    # stage 3 before its ReLU
s = model.verification_score(images[:1].repeat(4, 0), images)  # CVNet-Rerank, photo 0 vs all
g = model.superglobal_descriptor(images, scales=3, rgem=True, sgem=True, relup=True)
print("global_descriptor     ", d.shape, "norms", np.round(np.linalg.norm(d, axis=1), 4))
print("local_features        ", f.shape)
print("verification_score    ", s.shape, np.round(np.asarray(s), 4))
print("superglobal_descriptor", g.shape)

# Retrieval: photo 0 as the query against all four, then SuperGlobal reranking (M, K
# shrink to the database size) and the revisitop metrics. The first four minirevisit
# photos are views of one scene: call 1 an easy and 2, 3 hard positives, 0 (the query) junk.
X = np.asarray(g) / np.linalg.norm(g, axis=1, keepdims=True)
Q = X[:1]
ranks = np.argsort(-X @ Q.T, axis=0)                # (n_db, n_queries), best first
ranks = sj.rerank.superglobal(X, Q, ranks, M=400, K=9, beta=0.15)
gnd = [{"easy": [1], "hard": [2, 3], "junk": [0]}]
mapE, mapM, mapH, mpk = sj.metrics.revisitop(ranks, gnd, ks=(1, 5, 10))
print("ranking of query 0    ", ranks[:, 0])
print(f"mAP E/M/H {mapE:.4f} {mapM:.4f} {mapH:.4f}  mP@1,5,10 (M) {np.round(mpk[1], 4)}")
