"""AMES against the official code's outputs (../shared/rerankers/ames_seed*.npz): every group
the fixture holds (found by its `*/config` keys) and every input size of a group (the
`src_local` keys: the cut lengths and `full/`), at the README's tolerances: eval logits
(sim_f64: fp 2e-5, 2e-6 when the decoder is fed the reference's float16 database tokens;
dist 2e-6), training-mode logits 2e-6, the projected tokens, the float16 tokens and binary
codes (identical), every layer's output and the final tokens (1e-4, float64), and the
official evaluate(): the shortlists' logits (fp 5e-5, dist 5e-6), the re-ranked rankings
of every (k, lambda, temp) (identical), their E/M/H mAP (identical to 3 decimals) and the
returned result. Also the converter (official {'state': ...} file without torch, strict
keys, our model directory) and the database-token path (float16 tokens, packed codes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.errors import CheckpointError, ConfigError, InputError

AMES = sj.rerank.ames
ARCH_KEYS = ("local_dim", "model_dim", "nhead", "num_encoder_layers", "dim_feedforward",
             "binarized")


@pytest.fixture(scope="module")
def fixture(rerankers_fixture):
    return rerankers_fixture("ames")


def _groups(fx):
    names = sorted(k[:-len("/config")] for k in fx if k.endswith("/config"))
    assert names, "no AMES groups in the fixture"
    return names


def _sizes(fx, g):
    """The input sizes of a group: "" (the cut lengths) and "full/" (the stored ones)."""
    pre = sorted(k[len(g) + 1:-len("src_local")] for k in fx
                 if k.startswith(f"{g}/") and k.endswith("src_local") and "e2e" not in k)
    assert "" in pre and len(pre) >= 2, (g, pre)
    return pre


_MODELS: dict = {}


def _model(fx, g, dtype="float32"):
    c = json.loads(str(fx[f"{g}/config"]))
    sd = {k[len(f"{g}/weights/"):]: v for k, v in fx.items() if k.startswith(f"{g}/weights/")}
    spec = [name for name, _ in json.loads(str(fx[f"{g}/spec"]))]
    assert sorted(sd) == sorted(spec)
    key = (id(fx), g, dtype)
    if key not in _MODELS:
        _MODELS[key] = AMES.from_state_dict(
            sd, **{k: c[k] for k in ARCH_KEYS}, activation=c.get("activation", "relu"),
            normalize_before=c.get("normalize_before", False), dtype=dtype)
    return _MODELS[key], c, sd


def _close(got, want, atol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    assert err <= atol, f"{what}: max abs error {err:.2e} > {atol:.0e}"


def _inputs(fx, g, pre):
    return [fx[f"{g}/{pre}{n}"] for n in ("src_local", "src_mask", "tgt_local", "tgt_mask")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_tokens_and_codes_match_the_official_code(fixture, dtype):
    """Both precisions, every input size: the README's tolerances hold for float32 too."""
    for g in _groups(fixture):
        model, c, _ = _model(fixture, g, dtype)
        for pre in _sizes(fixture, g):
            what = f"{g} {pre or 'cut/'}{dtype}"
            q, qm, t, tm = _inputs(fixture, g, pre)
            _close(model.similarity(q, qm, t, tm), fixture[f"{g}/{pre}sim_f64"],
                   2e-6 if c["binarized"] else 2e-5, f"{what} sim_f64")
            _close(model.similarity(q, qm, t, tm, train=True),
                   fixture[f"{g}/{pre}sim_trainmode_f64"], 2e-6, f"{what} sim_trainmode_f64")
            tokens = model.db_tokens(t, tm)
            if c["binarized"]:
                assert tokens.dtype == np.int8
                np.testing.assert_array_equal(tokens, fixture[f"{g}/{pre}tgt_binary"], what)
                src = model.activations(q, qm, t, tm)["src_binary"]
                np.testing.assert_array_equal(src, fixture[f"{g}/{pre}src_binary"], what)
                continue
            f16 = fixture[f"{g}/{pre}tgt_remap_f16"]
            # the decoder fed the reference's database tokens: the looser fp tolerance above
            # is the float16 rounding of tokens computed in another precision
            _close(model.similarity_from_tokens(q, qm, f16.astype(np.float16), tm),
                   fixture[f"{g}/{pre}sim_f64"], 2e-6, f"{what} sim_f64 fed tgt_remap_f16")
            assert tokens.dtype == np.float16
            real = ~tm
            got, want = tokens[real].astype(np.float32), f16[real]
            if dtype == "float64":              # the same rounding as the reference
                np.testing.assert_array_equal(got, want, what)
            else:                               # ~1 in 1000 lands on the other neighbour
                diff = got != want
                assert diff.mean() <= 0.01, (what, int(diff.sum()))
                ulp = np.spacing(np.abs(want[diff]).astype(np.float16)).astype(np.float32)
                assert np.all(np.abs(got[diff] - want[diff]) <= ulp), what
            assert np.all(tokens[tm] == 0)


def test_activations_match_the_float64_reference(fixture):
    """Projected tokens, float16 tokens, each layer's output and the final tokens, in
    float64 (the float16 rounding of a float32 run can pick the other neighbour for a
    database token, moving the layers by 2.4e-4: the README's tolerance is float64's);
    float32 is held to the same 1e-4 wherever its float16 tokens equal the reference's."""
    for dtype in ("float64", "float32"):
        for g in _groups(fixture):
            model, c, _ = _model(fixture, g, dtype)
            act = model.activations(*_inputs(fixture, g, ""))
            tol = 1e-6 if dtype == "float64" else 1e-5
            _close(act["src_remap"], fixture[f"{g}/src_remap_f64"], tol, f"{g} src_remap")
            _close(act["tgt_remap"], fixture[f"{g}/tgt_remap_f64"], tol, f"{g} tgt_remap")
            if c["binarized"]:                  # no rounding: the remapped tokens
                _close(act["tgt_remap_f16"], fixture[f"{g}/tgt_remap_f16"], tol, g)
                same16 = True
            else:
                same16 = np.array_equal(act["tgt_remap_f16"], fixture[f"{g}/tgt_remap_f16"])
            if dtype == "float64":
                assert same16, g
            elif not same16:
                continue
            n_layers = len([k for k in fixture if k.startswith(f"{g}/layer")])
            assert n_layers == c["num_encoder_layers"] == len(act["layers"])
            for i in range(n_layers):
                _close(act["layers"][i], fixture[f"{g}/layer{i}_f64"], 1e-4,
                       f"{g} {dtype} layer{i}")
            _close(act["tokens_out"], fixture[f"{g}/tokens_out_f64"], 1e-4,
                   f"{g} {dtype} tokens_out")
            _close(act["sim"], fixture[f"{g}/sim_f64"], 2e-6 if c["binarized"] else 2e-5,
                   f"{g} {dtype} sim")


def _e2e(fx, g):
    p = json.loads(str(fx[f"{g}/e2e_params"]))
    q, qm = AMES.split_features(fx[f"{g}/e2e_query_hdf5"], p["query_sequence_len"])
    d, dm = AMES.split_features(fx[f"{g}/e2e_gallery_hdf5"], p["sequence_len"])
    nn = fx[f"{g}/e2e_cache_nn"]                       # (2, nq, K): similarities, indices
    ranks, sims = nn[1].T.astype(np.int64), nn[0].T
    np.testing.assert_array_equal(ranks, nn[1].T)       # indices stored exactly as floats
    return p, q, qm, d, dm, ranks, sims, json.loads(str(fx[f"{g}/e2e_gnd"]))


def test_end_to_end_reranking_matches_the_official_evaluate(fixture):
    """The official evaluate() (Medium and Hard runs, every (k, lambda, temp)) with the
    default float32 model: logits of the shortlist, rankings, E/M/H mAP, the result."""
    for g in _groups(fixture):
        model, c, _ = _model(fixture, g)
        p, q, qm, d, dm, ranks, sims, gnd = _e2e(fixture, g)
        combos = fixture[f"{g}/e2e_combos"]
        run = {}
        for setting in ("medium", "hard"):
            r, s = AMES.shortlist(ranks, sims, protocol="official", gnd=gnd, setting=setting)
            kmax = min(max(p["num_rerank"]), len(r))
            logits = model.shortlist_logits(q, qm, d, dm, r[:kmax], batch_size=7)
            _close(logits, fixture[f"{g}/e2e_raw_sim_{setting}"].T,
                   5e-6 if c["binarized"] else 5e-5, f"{g} e2e_raw_sim_{setting}")
            want_ranks = fixture[f"{g}/e2e_ranks_{setting}"]
            want_maps = fixture[f"{g}/e2e_map_EMH_{setting}"]
            assert len(combos) == len(want_ranks) == len(want_maps)
            for i, (k, lamb, temp) in enumerate(combos):
                what = f"{g} {setting} k={k:g} lamb={lamb:g} temp={temp:g}"
                got, scores = AMES.combine(r, s, logits, k=int(k), lamb=float(lamb),
                                           temp=float(temp))
                np.testing.assert_array_equal(got, want_ranks[i], err_msg=what)
                assert np.all(np.diff(scores, axis=0) <= 0), what
                maps = AMES.shortlist_map(got, gnd)
                np.testing.assert_array_equal(np.around(np.array(maps) * 100, 3),
                                              want_maps[i], err_msg=what)
                run[setting] = maps
            # the whole function, last combination, database read as tokens in odd batches
            db, fmt = model.db_tokens(d, dm), "tokens"
            if c["binarized"]:
                db, fmt = AMES.pack_codes(db), "packed"
            got, _ = AMES.rerank(model, q, qm, db, dm, ranks, sims, k=int(k),
                                 lamb=float(lamb), temp=float(temp), gnd=gnd,
                                 setting=setting, db_format=fmt, batch_size=5)
            np.testing.assert_array_equal(got, want_ranks[-1], err_msg=f"{g} rerank {setting}")
        (_, m_med, h_med), (_, m_hard, h_hard) = run["medium"], run["hard"]
        want = fixture[f"{g}/e2e_result"]
        assert np.around(m_med * 100, 3) == want[0] and np.around(h_hard * 100, 3) == want[1]
        assert abs(((m_med + h_med) / 2 + (m_hard + h_hard) / 2) / 2 - want[2]) < 1e-12


def test_shortlist_protocols(fixture):
    g = _groups(fixture)[0]
    _, _, _, _, _, ranks, sims, gnd = _e2e(fixture, g)
    r, s = AMES.shortlist(ranks, sims, protocol="blind")
    np.testing.assert_array_equal(r, ranks)
    for setting, moved in (("medium", ("junk",)), ("hard", ("junk", "easy"))):
        r, s = AMES.shortlist(ranks, sims, gnd=gnd, setting=setting)
        for i, qg in enumerate(gnd):
            bad = np.isin(ranks[:, i], [x for m in moved for x in qg[m]])
            np.testing.assert_array_equal(r[:, i], np.r_[ranks[~bad, i], ranks[bad, i]])
            np.testing.assert_array_equal(s[:, i], np.r_[sims[~bad, i], sims[bad, i]])
    with pytest.raises(ConfigError, match="needs the ground truth"):
        AMES.shortlist(ranks, sims)
    with pytest.raises(ConfigError, match="protocol"):
        AMES.shortlist(ranks, sims, protocol="oracle", gnd=gnd)


def test_database_tokens_and_packed_codes_give_identical_logits(fixture):
    for g in _groups(fixture):
        model, c, _ = _model(fixture, g)
        q, qm, t, tm = _inputs(fixture, g, "full/")
        want = model.similarity(q, qm, t, tm)
        tokens = model.db_tokens(t, tm)
        np.testing.assert_array_equal(model.similarity_from_tokens(q, qm, tokens, tm), want)
        if not c["binarized"]:
            continue
        codes = fixture[f"{g}/full/tgt_binary"]
        # zero codes come in whole tokens, from the zero descriptors of padded slots
        zero_tokens = np.all(codes == 0, axis=-1)
        np.testing.assert_array_equal(np.any(codes == 0, axis=-1), zero_tokens)
        np.testing.assert_array_equal(zero_tokens, tm)
        packed = AMES.pack_codes(codes)
        assert packed.dtype == np.uint8 and packed.shape[-1] == -(-c["model_dim"] // 8)
        np.testing.assert_array_equal(AMES.unpack_codes(packed, c["model_dim"], tm), codes)
        np.testing.assert_array_equal(AMES.unpack_codes(AMES.pack_codes(tokens),
                                                        c["model_dim"], tm), tokens)
        # without the mask the padded tokens read +1: they never reach the logit
        loose = AMES.unpack_codes(packed, c["model_dim"])
        np.testing.assert_array_equal(model.similarity_from_tokens(q, qm, loose, tm), want)


def test_official_checkpoint_converts_without_torch_and_round_trips(fixture, tmp_path,
                                                                      torch_save):
    for g in _groups(fixture):
        model, c, sd = _model(fixture, g)
        path = torch_save({"state": sd, "epoch": 1}, tmp_path / f"ames_{g}.pt")
        loaded = AMES.load(path, nhead=c["nhead"])
        assert loaded.arch == model.arch
        args = _inputs(fixture, g, "")
        want = model.similarity(*args)
        np.testing.assert_array_equal(loaded.similarity(*args), want)
        out = loaded.save(tmp_path / f"ames_dir_{g}")
        again = AMES.load(out)
        assert again.arch == model.arch and again.arch.kind == "ames"
        np.testing.assert_array_equal(again.similarity(*args), want)
        got_sd = again.state_dict()
        assert sorted(got_sd) == sorted(sd)
        for k, v in got_sd.items():
            np.testing.assert_array_equal(v, sd[k], err_msg=k)
        with pytest.raises(CheckpointError, match="holds a ames model, not a cvnet"):
            sj.load(out)
        with pytest.raises(CheckpointError, match="heads"):
            AMES.load(out, nhead=c["nhead"] + 1)
    # the reranker refuses official weights without the detector they read, before any work
    from scvnet_jax.rerank import registry
    with pytest.raises(ConfigError, match="give the official detector"):
        registry.ames_setup(str(path))
    det = sj.rerank.ames.detector_from_state_dict(_detector_state_dict(8), channels=8)
    assert registry.ames_setup(str(path), det)[1] is det


def _detector_state_dict(c: int) -> dict:
    rng = np.random.default_rng(0)
    return {"conv1.weight": rng.normal(size=(c, c, 1, 1)).astype(np.float32),
            "conv1.bias": np.zeros(c, np.float32), "bn.weight": np.ones(c, np.float32),
            "bn.bias": np.zeros(c, np.float32), "bn.running_mean": np.zeros(c, np.float32),
            "bn.running_var": np.ones(c, np.float32),
            "bn.num_batches_tracked": np.zeros((), np.int64),
            "conv2.weight": rng.normal(size=(1, c, 1, 1)).astype(np.float32),
            "conv2.bias": np.zeros(1, np.float32)}


def test_converter_lists_every_bad_key(fixture, tmp_path, torch_save):
    g = _groups(fixture)[0]
    _, c, sd = _model(fixture, g)
    bad = dict(sd)
    del bad["decoder.layers.0.norm1.weight"]
    bad["decoder.layers.0.linear1.weight"] = bad["decoder.layers.0.linear1.weight"][:-1]
    bad["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        AMES.from_state_dict(bad, **{k: c[k] for k in ARCH_KEYS})
    msg = str(e.value)
    assert "missing keys (1): decoder.layers.0.norm1.weight" in msg
    assert "unexpected keys (1): head.weight" in msg
    assert "mis-shaped keys (1): decoder.layers.0.linear1.weight" in msg
    with pytest.raises(CheckpointError, match="not an AMES state dict"):
        AMES.load(torch_save({"state": {"x.weight": np.zeros(2, np.float32)}},
                             tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not a multiple of nhead"):
        AMES.from_state_dict(sd, **{**{k: c[k] for k in ARCH_KEYS},
                                    "nhead": c["model_dim"] + 1})


def test_bad_input(fixture):
    g = _groups(fixture)[0]
    model, c, _ = _model(fixture, g)
    q, qm, t, tm = _inputs(fixture, g, "")
    with pytest.raises(InputError, match="pairs"):
        model.similarity(q, qm, t[:-1], tm[:-1])
    with pytest.raises(InputError, match="mask"):
        model.similarity(q, qm[:, :-1], t, tm)
    with pytest.raises(InputError, match=str(c["local_dim"])):
        model.similarity(q[..., :-1], qm, t, tm)
    with pytest.raises(ConfigError, match="db_format"):
        model.shortlist_logits(q, qm, t, tm, np.zeros((1, len(q)), int), db_format="raw")
    with pytest.raises(InputError, match="outside the database"):
        model.shortlist_logits(q, qm, t, tm, np.full((1, len(q)), len(t)))


def test_pre_norm_gelu_odd_heads_variant_converts_and_runs(tmp_path, torch_save):
    """The official options the reference groups do not use (normalize_before with the
    final decoder.norm, GELU) and an odd head count: read off the state dict, runnable,
    float32 and float64 agreeing, packed codes of a bit count that is not a multiple of 8."""
    from scvnet_jax.models import ames as ames_model
    arch = ames_model.AMESArch(local_dim=12, model_dim=9, nhead=3, num_encoder_layers=2,
                               dim_feedforward=7, binarized=True, activation="gelu",
                               normalize_before=True)
    sd = sj.convert.mapping.variables_to_state_dict(ames_model.init(arch, seed=1))
    assert "decoder.norm.weight" in sd and sd["remap_local.0.W"].shape == (12, 9)
    path = torch_save({"state": sd}, tmp_path / "prenorm.pt")
    with pytest.raises(CheckpointError, match="pass nhead="):
        AMES.load(path)
    model = AMES.load(path, nhead=3, activation="gelu")
    assert model.arch == arch
    rng = np.random.default_rng(0)
    q, t = rng.normal(size=(3, 5, 12)), rng.normal(size=(3, 4, 12))
    qm, tm = np.zeros((3, 5), bool), np.zeros((3, 4), bool)
    qm[0, 3:], tm[1, 2:] = True, True
    s32 = model.similarity(q, qm, t, tm)
    s64 = AMES.load(path, nhead=3, activation="gelu", dtype="float64").similarity(q, qm, t, tm)
    assert np.all(np.isfinite(s32)) and s64.dtype == np.float64
    _close(s32, s64, 1e-5, "pre-norm float32 vs float64")
    packed = AMES.pack_codes(model.db_tokens(t, tm))
    assert packed.shape == (3, 4, 2)
    got = model.similarity_from_tokens(q, qm, AMES.unpack_codes(packed, 9, tm), tm)
    np.testing.assert_array_equal(got, s32)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_rerank_images_is_the_model_on_each_pair_and_reuses_the_token_store(tmp_path,
                                                                             tiny_model):
    """`rerank_images` on image files (a random fp and dist AMES on the tiny CVNet's
    128-d features, no detector): the reranked shortlist and scores are the model's logits
    of each (query, candidate) pair from `local_descriptors` (query_len rows of the query,
    db_len of each database image), combined as the official code; only the shortlisted
    database images are extracted; a second run reads their tokens from the content-keyed
    store (no extraction) and gives the same result; the official protocol needs labels."""
    import cv2

    from scvnet_jax.engine import local
    from scvnet_jax.images import ImageRef
    from scvnet_jax.models.ames import AMESArch, init

    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        im = rng.integers(0, 255, (int(rng.integers(60, 110)), int(rng.integers(60, 110)), 3),
                          dtype=np.uint8)
        paths.append(str(tmp_path / f"im{i}.png"))
        cv2.imwrite(paths[-1], im)
    queries, db = [ImageRef(paths[0], (3.0, 5.0, 70.0, 58.0)), ImageRef(paths[1])], [
        ImageRef(p) for p in paths[2:]]
    dim = tiny_model.arch.local_dim
    ranks = np.stack([rng.permutation(5), rng.permutation(5)], axis=1)      # (5, 2)
    sims = np.sort(rng.uniform(0.2, 0.9, (5, 2)).astype(np.float32), axis=0)[::-1]
    k, ql, dl = 3, 12, 6
    for binarized in (False, True):
        arch = AMESArch(local_dim=dim, model_dim=16, nhead=2, num_encoder_layers=1,
                        dim_feedforward=32, binarized=binarized)
        model = AMES.AMES(arch, init(arch, 1))
        kw = dict(k=k, lamb=0.5, temp=2.0, query_len=ql, db_len=dl, protocol="blind")
        out = AMES.rerank_images(model, tiny_model, queries, db, ranks, sims,
                                 cache_dir=str(tmp_path / "cache"), **kw)
        got_ranks, got_scores = out[""]
        from scvnet_jax.images import read_image
        for qi, ref in enumerate(queries):
            q = AMES.split_features(local.local_descriptors(tiny_model, read_image(ref),
                                                            topk=ql)[None])
            cand = ranks[:k, qi]
            d = [AMES.split_features(local.local_descriptors(
                tiny_model, read_image(db[j]), topk=dl)[None]) for j in cand]
            logits = model.similarity(np.repeat(q[0], k, 0), np.repeat(q[1], k, 0),
                                      np.concatenate([x[0] for x in d]),
                                      np.concatenate([x[1] for x in d]))
            want, want_s = AMES.combine(ranks[:, qi:qi + 1], sims[:, qi:qi + 1],
                                        logits[:, None], k=k, lamb=0.5, temp=2.0)
            np.testing.assert_array_equal(got_ranks[:, qi], want[:, 0])
            np.testing.assert_allclose(got_scores[:, qi], want_s[:, 0], atol=2e-6)
        # only the shortlisted database images were extracted and stored
        store = next((tmp_path / "cache").glob("ames-tokens-*")) if not binarized else None
        if store is not None:
            assert len(list(store.glob("*.npz"))) == len(np.unique(ranks[:k]))
        calls = []
        real = local.extract_local

        def counting(model_, refs, *a, **kw_):
            calls.append(len(refs))
            return real(model_, refs, *a, **kw_)

        local.extract_local = counting
        try:
            again = AMES.rerank_images(model, tiny_model, queries, db, ranks, sims,
                                       cache_dir=str(tmp_path / "cache"), **kw)
        finally:
            local.extract_local = real
        assert calls == [len(queries)]                 # the queries only: db from the store
        np.testing.assert_array_equal(again[""][0], got_ranks)
        np.testing.assert_array_equal(again[""][1], got_scores)
    with pytest.raises(ConfigError, match="needs the ground truth"):
        AMES.rerank_images(model, tiny_model, queries, db, ranks, sims,
                           **{**kw, "protocol": "official"})
    with pytest.raises(ConfigError, match="reads 999-d"):
        AMES.rerank_images(AMES.AMES(AMESArch(local_dim=999, model_dim=16, nhead=2,
                                              num_encoder_layers=1, dim_feedforward=32),
                                     init(AMESArch(local_dim=999, model_dim=16, nhead=2,
                                                   num_encoder_layers=1,
                                                   dim_feedforward=32))),
                           tiny_model, queries, db, ranks, sims, **kw)


def test_rerank_images_takes_paths(tmp_path, tiny_model):
    """Image paths (str or Path) work as whole-image ImageRefs, also with the token store
    (content-keyed: it reads each file); anything else is one InputError naming it."""
    from pathlib import Path

    import cv2

    from scvnet_jax.images import ImageRef
    from scvnet_jax.models.ames import AMESArch, init

    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"im{i}.png"))
        cv2.imwrite(paths[-1], rng.integers(0, 255, (64, 72, 3), dtype=np.uint8))
    arch = AMESArch(local_dim=tiny_model.arch.local_dim, model_dim=16, nhead=2,
                    num_encoder_layers=1, dim_feedforward=32)
    model = AMES.AMES(arch, init(arch, 1))
    ranks = np.stack([rng.permutation(4), rng.permutation(4)], axis=1)      # (4, 2)
    sims = np.sort(rng.uniform(0.2, 0.9, (4, 2)).astype(np.float32), axis=0)[::-1]
    kw = dict(k=2, lamb=0.5, temp=2.0, query_len=8, db_len=4, protocol="blind",
              cache_dir=str(tmp_path / "cache"))
    want = AMES.rerank_images(model, tiny_model, [ImageRef(p) for p in paths[:2]],
                              [ImageRef(p) for p in paths[1:]], ranks, sims, **kw)[""]
    for conv in (str, Path):
        got = AMES.rerank_images(model, tiny_model, [conv(p) for p in paths[:2]],
                                 [conv(p) for p in paths[1:]], ranks, sims, **kw)[""]
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(InputError, match=r"db_refs\[0\] is a ndarray; expected an image file"):
        AMES.rerank_images(model, tiny_model, paths[:2], [np.zeros((8, 8, 3))] * 4, ranks,
                           sims, **kw)
