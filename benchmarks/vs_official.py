"""Our speed against the official code, side by side in one run: same weights, same inputs,
outputs compared, both sides on the same cores.

    python benchmarks/vs_official.py --official_cvnet ~/src/CVNet \\
        --official_superglobal ~/src/SuperGlobal [--cores 1] [--json out.json]

Rows (ratio = official time / our time; > 1: we are faster):
  global 512x512 b4       CVNet-Global forward, one scale, a batch of 4 (model level)
  global 768x1024 b4      the same at ROxford size
  extract cvnet           eval.py's CVNet-Global extraction (3 OpenCV-resized scales per image,
                          preprocessing included) of ROxford-size images (768x1024 and
                          1024x768) against the official test's loop (batch 1 per scale)
  extract superglobal     eval.py's SuperGlobal extraction (3 scales in the model) against the
                          official SuperGlobal test's loop
  verify (eval.py)        CVNet verification of one query against `--pairs` database images
                          from their local features (48x64 = ROxford size, and a cropped query),
                          as eval.py, sj.search and the app score pairs (per-image corr
                          features, padded pair batches), against the official
                          extract_score_with_featuremap per pair
  verify (unpadded)       the same pairs through verification_score_from_features
  superglobal rerank      MDescAug + RerankwMDA, 70 queries x 5000 x 2048 (M=400, K=9)
  ames extract            AMES's local descriptors (R101 stage 3 at 3 OpenCV scales, the
                          detector, the top 700 of each image; preprocessing included) of
                          ROxford-size images, as eval.py / `scvnet-search index` extract them
                          (exact sizes: what bucket "auto" settles on for a large collection),
                          against the official extract_cvnet loop (batch 1, its ResNet(101),
                          which also runs stage 4)
  ames fp / ames dist     AMES pair scoring at the released size (1024-d descriptors, model
                          128, 5 layers; 600 query / 50 database descriptors; the top 100 of
                          each query in batches of 100), ours from the token store as eval.py
                          reads it, against the official model (benchmarks/ames.py's rows)

--official_cvnet: a checkout of github sungonce/CVNet; --official_superglobal: one of
ShihaoShao-GH/SuperGlobal (its resnet imports torchvision only for a tensor resize: when
torchvision is missing a stand-in with the same arithmetic is used, bilinear without
antialiasing); --official_ames: one of pavelsuma/ames. Needs torch (CPU). Rows whose official side is missing are timed for us only
and say why. Weights are random (speed does not depend on them) unless --weights is given.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path


def _pin(cores: int) -> None:
    """Pins this process (and the thread pools created later) to the first `cores` CPUs."""
    if cores > 0 and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(allowed[:cores]))


def _timed(fn, repeats: int) -> float:
    fn()                                           # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _official(checkout: str | None, what: str, required: str):
    """Imports an official checkout's packages (fresh: both repos name them alike) -> the
    path, or a reason it is skipped."""
    if checkout is None:
        return None, f"no --official_{what} given"
    root = Path(checkout)
    if not (root / required).is_file():
        return None, f"{root} has no {required}"
    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed"
    for name in list(sys.modules):
        if name.split(".")[0] in ("model", "modules", "core", "test", "src", "extract"):
            del sys.modules[name]
    while str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    return root, None


def _torchvision_stand_in():
    """torchvision.transforms.functional.resize for tensors, without antialiasing (what the
    official SuperGlobal results were computed with)."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:     # missing, or built for another torch
        pass
    import torch.nn.functional as F
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    tv.transforms.functional.resize = lambda x, size: F.interpolate(
        x, size=list(size), mode="bilinear", align_corners=False)
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                        "torchvision.transforms.functional": tv.transforms.functional})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official_cvnet", default=None, help="a checkout of sungonce/CVNet")
    p.add_argument("--official_superglobal", default=None,
                   help="a checkout of ShihaoShao-GH/SuperGlobal")
    p.add_argument("--official_ames", default=None, help="a checkout of pavelsuma/ames")
    p.add_argument("--ames_queries", type=int, default=2,
                   help="queries (top 100 each) per AMES pair-scoring row")
    p.add_argument("--weights", default=None, help="a CVNet checkpoint or model dir "
                   "(default: random R50)")
    p.add_argument("--cores", type=int, default=1, help="CPUs both sides run on (0: all)")
    p.add_argument("--images", type=int, default=4, help="images per extraction row")
    p.add_argument("--pairs", type=int, default=8, help="pairs per verification row")
    p.add_argument("--batch_size", type=int, default=0,
                   help="our images per batch (default 0: eval.py's choice for the backend)")
    p.add_argument("--pair_batch", type=int, default=0,
                   help="our pairs per batch (default 0: eval.py's choice for the backend)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (the best is kept)")
    p.add_argument("--only", default=None, help="comma-separated row prefixes to run "
                   "(global, extract, verify, superglobal, ames)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    _pin(args.cores)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import scvnet_jax as sj
    from scvnet_jax.convert.mapping import variables_to_state_dict
    from scvnet_jax.data import batching
    from scvnet_jax.engine import extract, verify
    from scvnet_jax.rerank.superglobal import superglobal
    try:
        import torch
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    except ImportError:
        torch = None

    model = sj.load(args.weights) if args.weights else sj.create(50)
    args.batch_size = args.batch_size or batching.default_batch_size("images")
    args.pair_batch = args.pair_batch or batching.default_batch_size("pairs")
    sd = {k: np.asarray(v) for k, v in variables_to_state_dict(
        jax.device_get(model.variables)).items()}
    rng = np.random.default_rng(0)
    want = (lambda row: args.only is None
            or any(row.startswith(w.strip()) for w in args.only.split(",")))
    print(f"machine: {platform.processor() or platform.machine()}, {args.cores or os.cpu_count()}"
          f" core(s) pinned; jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__ if torch else '-'}; R{model.depth}, weights {model.source}")
    results = []

    def report(row, ours_s, units, n, official_s=None, why=None, err=None):
        r = {"row": row, "ours_per_s": n / ours_s, "units": units}
        line = f"{row:24s} ours {n / ours_s:8.3f} {units}/s"
        if official_s is not None:
            r.update(official_per_s=n / official_s, ratio=official_s / ours_s, max_abs_diff=err)
            line += (f" | official {n / official_s:8.3f} {units}/s | ratio "
                     f"{official_s / ours_s:5.2f}x | max |diff| {err:.1e}")
        else:
            r["official"] = why
            line += f" | official skipped ({why})"
        results.append(r)
        print(line, flush=True)

    # -- official models ---------------------------------------------------------------
    off_cv, why_cv = _official(args.official_cvnet, "cvnet", "model/CVNet_Rerank_model.py")
    cvnet_t = None
    if off_cv is not None:
        from model.CVNet_Rerank_model import CVNet_Rerank
        import core.transforms as cv_transforms
        cvnet_t = CVNet_Rerank(model.depth, model.arch.reduction_dim).eval()
        cvnet_t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    off_sg, why_sg = _official(args.official_superglobal, "superglobal",
                               "model/CVNet_Rerank_model.py")
    sg_t = None
    if off_sg is not None:
        _torchvision_stand_in()
        from model.CVNet_Rerank_model import CVNet_Rerank as SGRerank
        sg_t = SGRerank(model.depth, model.arch.reduction_dim, True).eval()
        sg_t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        sys.modules.pop("modules", None)
        from modules.reranking.MDescAug import MDescAug
        from modules.reranking.RerankwMDA import RerankwMDA

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))

    # -- CVNet-Global forward ------------------------------------------------------------
    for h, w in ((512, 512), (768, 1024)):
        row = f"global {h}x{w} b4"
        if not want(row):
            continue
        x = rng.normal(size=(4, h, w, 3)).astype(np.float32)
        xj = jnp.asarray(x)
        ours = _timed(lambda: jax.block_until_ready(model.global_descriptor(xj)), args.repeats)
        if cvnet_t is None:
            report(row, ours, "img", 4, why=why_cv)
            continue
        with torch.no_grad():
            xt = nchw(x)
            off = _timed(lambda: cvnet_t.extract_global_descriptor(xt), args.repeats)
            err = np.abs(cvnet_t.extract_global_descriptor(xt).numpy()
                         - np.asarray(model.global_descriptor(xj))).max()
        report(row, ours, "img", 4, off, err=float(err))

    # -- extraction as eval.py -----------------------------------------------------------
    sizes = [(768, 1024), (1024, 768)]
    images = [rng.integers(0, 256, size=sizes[i % 2] + (3,), dtype=np.uint8)
              for i in range(args.images)]
    bar = types.SimpleNamespace(update=lambda n: None)

    def official_prepare(im):   # the official test's DataSet._prepare_im
        im = im.transpose([2, 0, 1]) / 255.0
        return cv_transforms.color_norm(im, [0.406, 0.456, 0.485], [0.225, 0.224, 0.229])

    for name, spec, off_model in (("extract cvnet", extract.CVNetGlobal(), cvnet_t),
                                  ("extract superglobal", extract.SuperGlobal(), sg_t)):
        if not want(name):
            continue
        ours_fn = lambda: extract.describe_images(model, images, spec, args.batch_size,
                                                  64, bar)
        ours = _timed(ours_fn, args.repeats)
        if off_model is None:
            report(name, ours, "img", len(images), why=why_cv if "cvnet" in name else why_sg)
            continue

        def official_fn():
            out = []
            with torch.no_grad():
                for im in images:
                    if off_model is cvnet_t:       # test_utils.extract_feature, 3 scales
                        parts = []
                        for x in extract.cvnet_scales(im):
                            t = torch.from_numpy(official_prepare(x.astype(np.float32))
                                                 .astype(np.float32))[None]
                            parts.append(off_model.extract_global_descriptor(t)[0].numpy())
                        d = np.mean(parts, 0)
                    else:                          # SuperGlobal's extract_feature
                        t = torch.from_numpy(official_prepare(im.astype(np.float32))
                                             .astype(np.float32))[None]
                        d = off_model.extract_global_descriptor(t, True, True, True, 3)[0]
                        d = d.numpy()
                    out.append(d / np.linalg.norm(d))
            return np.stack(out)
        off = _timed(official_fn, args.repeats)
        err = np.abs(official_fn() - ours_fn()).max()
        report(name, ours, "img", len(images), off, err=float(err))

    # -- CVNet verification --------------------------------------------------------------
    if want("verify"):
        # Local features of ROxford-size images (48x64 and 64x48) and of a cropped query.
        key_imgs = rng.normal(size=(2, 768, 1024, 3)).astype(np.float32)
        f48 = np.asarray(model.local_features(key_imgs))
        f64 = np.asarray(model.local_features(key_imgs.transpose(0, 2, 1, 3)))
        keys = [(f48 if i % 2 == 0 else f64)[(i // 2) % 2] for i in range(args.pairs)]
        query = f48[0, 5:41, 3:58]
        pairs = [(i, None, None) for i in range(len(keys))]

        def ours_fn():
            cq, = verify.corr_features(model, [query], args.pair_batch, 4)
            ck = verify.corr_features(model, keys, args.pair_batch, 4)
            got = verify.score_pairs(model, [(i, cq, ck[i]) for i, _, _ in pairs],
                                     args.pair_batch, 4)
            return np.array([got[i] for i in range(len(keys))])

        def unpadded_fn():
            out = []
            for k in keys:     # one compiled shape per key shape, batch of 1 query
                out.append(model.verification_score_from_features(query[None], k[None]))
            return np.concatenate([np.asarray(o) for o in out])

        ours = _timed(ours_fn, args.repeats)
        unp = _timed(unpadded_fn, args.repeats)
        if cvnet_t is None:
            report("verify (eval.py)", ours, "pair", len(keys), why=why_cv)
            report("verify (unpadded)", unp, "pair", len(keys), why=why_cv)
        else:
            qt = [nchw(query[None])]
            kt = [[nchw(k[None])] for k in keys]

            def official_fn():
                with torch.no_grad():
                    return np.array([float(cvnet_t.extract_score_with_featuremap(qt, k))
                                     for k in kt])
            off = _timed(official_fn, max(1, args.repeats - 1))
            ref = official_fn()
            report("verify (eval.py)", ours, "pair", len(keys), off,
                   err=float(np.abs(ours_fn() - ref).max()))
            report("verify (unpadded)", unp, "pair", len(keys), off,
                   err=float(np.abs(unpadded_fn() - ref).max()))
        print(f"{'':24s} eval.py path / unpadded path time: {ours / unp:.2f}")

    # -- SuperGlobal reranking -----------------------------------------------------------
    row = "superglobal rerank"
    if want(row):
        X = rng.normal(size=(5000, 2048)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Q = X[:70] + 0.5 * rng.normal(size=(70, 2048)).astype(np.float32)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        ranks = np.argsort(-(X @ Q.T), axis=0, kind="stable")
        ours = _timed(lambda: superglobal(X, Q, ranks), args.repeats)
        if sg_t is None:
            report(row, ours, "query", 70, why=why_sg)
        else:
            torch.Tensor.cuda = lambda self, *a, **k: self     # the official code calls .cuda()
            Xt, Qt, rt = torch.from_numpy(X), torch.from_numpy(Q), torch.from_numpy(ranks)

            def official_fn():
                with torch.no_grad():
                    return RerankwMDA()(rt, *MDescAug()(Xt, Qt, rt)).numpy()
            off = _timed(official_fn, args.repeats)
            same = float(np.mean(official_fn()[:400] == superglobal(X, Q, ranks)[:400]))
            report(row, ours, "query", 70, off, err=1.0 - same)
            print(f"{'':24s} (max |diff| here: the fraction of top-400 ranks that differ)")

    # -- AMES: local-descriptor extraction and pair scoring -------------------------------
    off_am, why_am = _official(args.official_ames, "ames", "extract/extract_cvnet.py")
    if want("ames extract"):
        from scvnet_jax.engine import local
        r101 = sj.create(101)
        det_sd = {k: rng.normal(size=shape).astype(np.float32) * 0.05
                  for k, shape in local._expected_keys(1024).items()}
        det_sd["bn.running_var"] = rng.uniform(0.5, 1.5, size=1024).astype(np.float32)
        det_sd["bn.weight"] = rng.uniform(0.5, 1.0, size=1024).astype(np.float32)
        det_sd["conv1.weight"] *= 20 * np.sqrt(2.0 / 1024)
        detector = local.detector_from_state_dict(det_sd)
        # exact sizes: what eval.py's bucket "auto" settles on for a collection of photos of
        # these sizes (every size its own program once it is frequent), here compiled by
        # the warm-up
        ours_fn = lambda: local.describe_local(r101, images, detector, local.TOPK,  # noqa: E731
                                               dtype=np.float32, bucket=1)
        ours = _timed(ours_fn, args.repeats)
        if off_am is None:
            report("ames extract", ours, "img", len(images), why=why_am)
        else:
            from extract.extract_cvnet import extract_feat_res_pycls, get_local
            from extract.spatial_attention_2d import SpatialAttention2d
            from extract.transforms import color_norm
            from src.models.resnet import ResNet
            torch.Tensor.cuda = lambda self, *a, **k: self     # the official code calls .cuda()
            res = ResNet(101, 2048).eval()
            r_sd = {k.replace("encoder_q.", ""): torch.from_numpy(np.asarray(v))
                    for k, v in variables_to_state_dict(jax.device_get(r101.variables)).items()}
            missing = res.load_state_dict(r_sd, strict=False).missing_keys
            assert not missing, f"official ResNet(101) keys not in our weights: {missing[:3]}"
            det_t = SpatialAttention2d(1024).eval()
            det_t.load_state_dict({k: torch.from_numpy(v) for k, v in det_sd.items()},
                                  strict=False)

            def official_fn():
                out = []
                with torch.no_grad():
                    for im in images:        # extract_local_feature, DataSet.__getitem__
                        feats, weights, scales = [], [], []
                        for s, x in zip(local.SCALES, extract.cvnet_scales(im)):
                            t = torch.from_numpy(color_norm(
                                x.astype(np.float32).transpose([2, 0, 1]) / 255.0,
                                [0.406, 0.456, 0.485], [0.225, 0.224, 0.229]))[None].float()
                            f, w = det_t(extract_feat_res_pycls(t, res)[0])
                            feats.append(f)
                            weights.append(w)
                            scales.append((torch.tensor([s]), torch.tensor([s])))
                        _, w, *_ = get_local(feats, weights, scales, topk=local.TOPK)
                        out.append(w.numpy())
                return out
            off = _timed(official_fn, max(1, args.repeats - 1))
            got = ours_fn()
            err = max(float(np.abs(np.sort(w)[::-1] - got.weight[i, :len(w)]).max())
                      for i, w in enumerate(official_fn()))
            report("ames extract", ours, "img", len(images), off, err=err)
            print(f"{'':24s} (max |diff| here: of the 700 selected detector weights)")
    if want("ames fp") or want("ames dist"):       # benchmarks/ames.py's rows
        spec = importlib.util.spec_from_file_location(
            "bench_ames", Path(__file__).resolve().parent / "ames.py")
        bench_ames = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_ames)
    for variant in ("fp", "dist"):
        row = f"ames {variant}"
        if not want(row):
            continue
        r = bench_ames.compare("r101", variant, args.ames_queries, 100, 100,
                               None if off_am is None else str(off_am))
        n = r["pairs"]
        if off_am is None:
            report(row, n / r["ours_pairs_per_s"], "pair", n, why=why_am)
        else:
            report(row, n / r["ours_pairs_per_s"], "pair", n, n / r["official_pairs_per_s"],
                   err=r["max_abs_logit_diff"])

    if args.json:
        Path(args.json).write_text(json.dumps({"cores": args.cores, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
