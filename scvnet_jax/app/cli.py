"""scvnet-search: index a photo collection and search it by image, here or in a web page.

    scvnet-search index PHOTOS/ --index my.index [--weights CVPR2022_CVNet_R50.pyth]
                                                  [--family cvnet|superglobal]
    scvnet-search query --index my.index query.jpg [-k 10] [--rerank none|superglobal|...]
                                                    [--regions 5] [--box X1,Y1,X2,Y2] [--json]
                                                    [--explain DIR]  # why each hit matched
    scvnet-search serve --index my.index [--host 127.0.0.1] [--port 8000]  # page + REST API
                        [--watch]                  # re-indexes as the folder changes
    scvnet-search duplicates --index my.index --threshold 0.995 [--json | --csv]
    scvnet-search convert my.index my.folder   # larger than memory: IVF-PQ, lists on disk
    SCVNET_SEARCH_TOKEN=SECRET scvnet-search serve --index my.index --host 0.0.0.0

(`python -m scvnet_jax.app ...` is the same.) Without --weights the bundled demo model is
used, so both run on a fresh machine. `index` is incremental: a rerun extracts only new or
changed files (by content) and drops deleted ones; a run killed at any point resumes where
it stopped. `query` loads the model the index was built with (or --weights, checked to
give the same descriptors) and prints the top k per query image, as a table or, with
--json, one JSON object per query: {"query": ..., "hits": [{"path": ..., "score": ...}]}
with the scores the final ranking is sorted by. --regions N also searches N regions of the
query proposed from the network's own activations (scvnet_jax.regions) and merges the hit
lists by each image's best score; --box searches a crop. `serve` on any address but a
loopback one needs a token (SCVNET_SEARCH_TOKEN or --token) that every request then
carries (Authorization: Bearer; the page asks for it once). `index --distributed` runs one
process per host (the same command on each, a filesystem all see) and shares the work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from scvnet_jax import cli
from scvnet_jax.app.server import duplicates_json, shown
from scvnet_jax.errors import InputError

FAMILIES = ("cvnet", "superglobal")
DTYPES = ("float16", "float32")


class _Parser(argparse.ArgumentParser):
    def error(self, message):       # one line, exit 2, like every other bad input
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _bucket(text: str) -> int | str:
    from scvnet_jax.data import batching
    try:
        return batching.parse_bucket(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonnegative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {text!r}")
    return int(text)


def _box(text: str) -> tuple[float, ...]:
    from scvnet_jax.app.server import parse_box
    try:
        return parse_box(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _option(text: str) -> tuple[str, object]:
    """NAME=VALUE; VALUE read as JSON when it is (2, 0.5, true), else a string."""
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scvnet-search", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ix = sub.add_parser("index", help="index (or bring up to date) the images of a folder",
                        description="Index every image under FOLDER (recursive) into the "
                        "index file: only new or changed files are extracted; deleted ones "
                        "are dropped; unreadable ones are skipped and listed.")
    ix.add_argument("folder", help="folder of images (.jpg .jpeg .png .bmp .webp .tif .tiff)")
    ix.add_argument("--index", required=True, help="the index file to create or update")
    ix.add_argument("--weights", default="demo",
                    help="official .pyth/.pth checkpoint, a model directory, or a training "
                         "run's checkpoint step W/checkpoints/<step> (default: the bundled "
                         "demo model)")
    ix.add_argument("--family", choices=FAMILIES, default="cvnet",
                    help="global descriptor: CVNet-Global (3 scales) or SuperGlobal")
    ix.add_argument("--dtype", choices=DTYPES, default="float16",
                    help="how descriptors are stored (float16 halves the file; the ranking "
                         "changes only where two scores tie to 3 decimals)")
    ix.add_argument("--on_error", choices=("skip", "raise"), default="skip",
                    help="skip: list unreadable images and index the rest; raise: stop")
    ix.add_argument("--rebuild", action="store_true",
                    help="re-extract everything (needed to change model, family or dtype)")
    ix.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                    help="exact: every vector searched on the device; faiss: an approximate "
                         "faiss index inside the index file, its recall@10 reported (the "
                         "faiss extra); auto: faiss from 200k images when installed")
    ix.add_argument("--faiss_kind", choices=("hnsw", "ivf", "ivfpq", "flat"), default="hnsw",
                    help="the faiss index (default hnsw)")
    ix.add_argument("--chunk_size", type=_positive, default=64,
                    help="new images per saved chunk: a killed run resumes from the last")
    ix.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="extract the new images as a Ray Data job on this Ray cluster "
                         "(auto, HOST:PORT or ray://HOST:PORT): a model per actor, the "
                         "folder and the index's .parts/ on a filesystem every worker sees "
                         "(the ray extra)")
    ix.add_argument("--ray_actors", type=_positive, default=None, metavar="N",
                    help="with --ray: actors (default one per GPU of the cluster, or one "
                         "per node without GPUs)")
    ix.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first: one process per host, "
                         "the same command on each, the folder and index on a filesystem "
                         "all see; the work is shared and process 0 writes the index")
    ix.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                    help="with --distributed: process 0's address (default: from the "
                         "cluster environment)")
    ix.add_argument("--num_processes", type=_positive, default=None,
                    help="with --distributed: number of processes")
    ix.add_argument("--process_id", type=_nonnegative, default=None,
                    help="with --distributed: this process's index")
    _common(ix)
    q = sub.add_parser("query", help="search the index with query images",
                       description="Top-k images of the index for each query image.")
    q.add_argument("queries", nargs="+", help="query image file(s)")
    q.add_argument("--index", required=True, help="an index written by `scvnet-search index`")
    q.add_argument("-k", type=_positive, default=10, help="hits per query (default 10)")
    from scvnet_jax.rerank import registry
    q.add_argument("--rerank", default="none",
                   help="none, or a reranker: " + ", ".join(
                       n + (" (--option weights=MODEL)" if registry.get(n).needs_weights
                            else "") for n in registry.names()))
    q.add_argument("--rerank_k", type=_positive, default=100,
                   help=f"how many of the top hits {_depth_rerankers()} re-order "
                        "(default 100)")
    q.add_argument("--option", type=_option, action="append", default=[],
                   metavar="NAME=VALUE", help="a reranker option, e.g. --option M=400 or "
                   "--option weights=MODEL (repeatable; the options: python -m "
                   "scvnet_jax.eval --help)")
    q.add_argument("--regions", type=_nonnegative, default=0, metavar="N",
                   help="also search N regions of each query that the network proposes "
                        "(no detector); hit lists merged by each image's best score")
    q.add_argument("--box", type=_box, default=None, metavar="X1,Y1,X2,Y2",
                   help="search this crop of the query image (pixels)")
    q.add_argument("--weights", default=None,
                   help="the model to describe the queries with (default: the one the index "
                        "was built with; another one must give the same descriptors)")
    q.add_argument("--root", default=None,
                   help="where the indexed folder is now, if it was moved")
    q.add_argument("--json", action="store_true", help="one JSON object per query")
    q.add_argument("--explain", default=None, metavar="DIR",
                   help="also write, per hit, a picture of why it matched: the mutual nearest "
                        "neighbours of the query's and the hit's local descriptors, the ones a "
                        "robust homography keeps in green (DIR/<query>/<rank>_<hit>.jpg); "
                        "adds each hit's inlier count to the table and the JSON")
    _backend_flags(q)
    _common(q)
    dp = sub.add_parser("duplicates", help="groups of near-identical photos in an index",
                        description="Groups of near-identical photos (copies, re-encodes, "
                        "resizes, light crops): each indexed image is linked to those of its "
                        "k nearest neighbours whose cosine similarity is at least --threshold "
                        "(through the index's search backend, so it scales with the index), "
                        "and files of the same content always; the connected groups are "
                        "listed, largest first. Reads the index only: no model, no image.")
    dp.add_argument("--index", required=True, help="an index written by `scvnet-search index`")
    dp.add_argument("--threshold", type=_similarity, required=True, metavar="T",
                    help="the cosine similarity (of the index's global descriptors) that "
                         "links two photos; it depends on the model (the bundled demo model: "
                         "0.995-0.997 keeps look-alikes apart); measure yours with "
                         "benchmarks/duplicates.py (docs: The search app, Duplicates)")
    dp.add_argument("-k", type=_positive, default=10,
                    help="neighbours looked at per photo (default 10); more near-copies of "
                         "one photo than k are joined through each other")
    dp.add_argument("--root", default=None, help="where the indexed folder is now, if moved")
    out = dp.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object")
    out.add_argument("--csv", action="store_true",
                     help="CSV: group,id,path,best,weakest_link,identical (one row per photo)")
    _backend_flags(dp)
    cv = sub.add_parser("convert", help="an index file as a folder larger than memory",
                        description="Write the index file INDEX as the folder OUT: float16 "
                        "descriptors in memory-mapped shards, an IVF-PQ faiss index over them "
                        "with its lists on disk (trained on a sample, filled shard by shard), "
                        "the paths on disk. query, serve and duplicates open it (--index OUT) "
                        "without reading it whole; each query's top --shortlist from IVF-PQ "
                        "is re-scored exactly from the stored vectors. Needs the faiss extra.")
    cv.add_argument("index", help="an index file written by `scvnet-search index`")
    cv.add_argument("out", help="the index folder to write (a new name, or an index folder "
                                "to replace)")
    cv.add_argument("--nlist", type=_positive, default=None,
                    help="inverted lists (default ~4 sqrt(N))")
    cv.add_argument("--pca", type=_nonnegative, default=None,
                    help="dimensions after a PCA before IVF-PQ (default 256 when the "
                         "descriptors have more and there are 1024+ of them; 0: none)")
    cv.add_argument("--m", type=_positive, default=None,
                    help="PQ sub-vectors, dividing the (PCA) dimension (default 32)")
    cv.add_argument("--nprobe", type=_positive, default=None,
                    help="lists searched per query (default 64)")
    cv.add_argument("--shard_rows", type=_positive, default=None,
                    help="vectors per descriptor shard (default 262144)")
    sv = sub.add_parser("serve", help="the web page and REST API over an index",
                        description="Serve the search page and the REST API (GET /api/health, "
                        "POST /api/search, GET /api/image/{id}, GET /api/duplicates, docs at "
                        "/docs) over one index, with the model loaded once; beyond loopback "
                        "every request needs the token (--token). Needs the app extra: "
                        "pip install 'scvnet_jax[app]'.")
    sv.add_argument("--index", required=True, help="an index written by `scvnet-search index`")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    sv.add_argument("--token", default=None,
                    help=f"a secret every request must carry (Authorization: Bearer TOKEN; the "
                         f"page asks for it once). Required when --host is not a loopback "
                         f"address. Better in the environment, {TOKEN_ENV}, than on the "
                         f"command line, where other users of the machine can see it")
    sv.add_argument("--weights", default=None, help="as for query")
    sv.add_argument("--root", default=None, help="where the indexed folder is now, if moved")
    sv.add_argument("--max_upload_mb", type=_positive, default=20,
                    help="largest query upload accepted (default 20 MB)")
    sv.add_argument("--watch", action="store_true",
                    help="follow the indexed folder: when files are added, changed or removed "
                         "(after 1 s without a new change), re-index it incrementally into "
                         "the index file and search the new index from the next request on "
                         "(each request searches one whole index, never a half-built one); "
                         "unreadable files are skipped and listed. Needs watchdog (the app "
                         "extra)"),
    for flag, (r, o) in _path_flags().items():    # the registry's weights and detectors
        sv.add_argument(f"--{flag}", default=None, metavar="PATH",
                        help=(f"offer the {r.name} reranker: " if o.name == "weights" and
                              r.needs_weights else f"for the {r.name} reranker: ") + o.help)
    _backend_flags(sv)
    sv.add_argument("--max_image_pixels", type=_positive, default=None,
                    help="largest query image, in pixels, from its header (default 100 "
                         "megapixels, SCVNET_MAX_IMAGE_PIXELS)")
    _common(sv)
    return p


def _depth_rerankers() -> str:
    """'cvnet, csa, ames and chamfer': the rerankers whose depth --rerank_k sets."""
    from scvnet_jax.rerank import registry
    names = [n for n in registry.names() if registry.get(n).depth and
             registry.get(n).depth_from_rerank_k]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + "".join(names[-1:])


def _path_flags() -> dict:
    """flag -> (reranker, Option): the registry's file options that have a flag (weights,
    a detector); `serve` offers a reranker that needs weights only when given them."""
    from scvnet_jax.rerank import registry
    return {o.flag: (r, o) for r in registry.RERANKERS.values() for o in r.options
            if o.flag and o.path}


def _backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("index", "exact", "faiss", "qdrant"), default="index",
                   help="index: the one the index was built with; exact; faiss (its own, "
                        "or an HNSW built now); qdrant: the vectors in a Qdrant collection "
                        "(local, in memory, or --qdrant_url; the qdrant extra)")
    p.add_argument("--qdrant_url", default=None,
                   help="a Qdrant server (e.g. http://localhost:6333) for --backend qdrant")
    p.add_argument("--shortlist", type=_positive, default=1000,
                   help="with faiss or qdrant: candidates per query that rerankers see")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch_size", type=_nonnegative, default=0,
                   help="images per device per batch (default 0: auto, 1 on CPU, 8 on GPU/TPU)")
    p.add_argument("--bucket", type=_bucket, default="auto",
                   help="pad image sides to a multiple of this (fewer compiled shapes), or "
                        "'auto' (default): a few padded shapes chosen from the images' sizes")
    p.add_argument("--workers", type=_positive, default=4, help="image-decoding threads")
    p.add_argument("--max_side", type=_nonnegative, default=None, metavar="PIXELS",
                   help="working size: images with a longer side are read reduced to it "
                        "(0: full size; default: the index's, or 1024 for a new index "
                        "and for queries of an index at full size)")
    p.add_argument("--cache_dir", default=None,
                   help="compiled programs are kept in CACHE_DIR/xla (default: "
                        "~/.cache/scvnet_jax; '' for none)")


def _weights_path(weights: str) -> str:
    if weights == "demo":
        return weights
    p = Path(weights).expanduser()
    if not p.exists():
        raise InputError(f"--weights {weights}: no such file or model directory")
    return str(p.resolve())


def _load(weights: str):
    from scvnet_jax import api as sj
    return sj.load(sj.demo_model_path() if weights == "demo" else weights)


def _setup(args) -> None:
    from scvnet_jax.evaluation.config import default_cache_dir
    cli.use_compilation_cache(default_cache_dir() if args.cache_dir is None
                              else args.cache_dir)


def index_command(args) -> int:
    from scvnet_jax import images, mesh, search

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{args.folder}: not a folder")
    if Path(args.index).expanduser().is_dir():
        raise InputError(f"--index {args.index}: is a folder; the index is a file")
    if args.ray and args.distributed:
        raise InputError("--ray and --distributed: extraction runs on one of them, not both")
    weights = _weights_path(args.weights)
    images.set_max_side(search.recorded_max_side(Path(args.index).expanduser())
                        if args.max_side is None else args.max_side)
    cli.start_distributed(args.distributed, args.coordinator_address, args.num_processes,
                          args.process_id)     # before anything touches the devices
    _setup(args)
    model = _load(weights)
    index, stats = search.update_index(
        model, folder, args.index, args.family, weights=weights, dtype=args.dtype,
        on_error=args.on_error, rebuild=args.rebuild, backend=args.backend,
        faiss_kind=args.faiss_kind, chunk_size=args.chunk_size, batch_size=args.batch_size,
        bucket=args.bucket, workers=args.workers, ray=args.ray, ray_actors=args.ray_actors)
    if mesh.process_index() != 0:
        return 0
    rate = (f", {stats['images_per_second']:.2f} img/s"
            if stats["images_per_second"] else "")
    print(f"indexed {shown(index.root)}: {stats['indexed']} images ({stats['reused']} reused, "
          f"{stats['extracted']} extracted, {stats['removed']} removed, {stats['skipped']} "
          f"skipped) in {stats['seconds']:.1f} s{rate}")
    size = os.path.getsize(Path(args.index).expanduser())
    print(f"wrote {shown(args.index)}: {len(index)} x {index.descriptors.shape[1]} "
          f"{index.descriptors.dtype} ({index.family}), {size / 2**20:.1f} MB; search "
          f"{_backend_text(index)}")
    return 0


def convert_command(args) -> int:
    from scvnet_jax import search
    from scvnet_jax.engine import ondisk

    src = Path(args.index).expanduser()
    if src.is_dir():
        raise InputError(f"{args.index}: is already an index folder")
    index = search.Index.load(src)
    ondisk.check_layout(index.descriptors.shape, pca=args.pca, m=args.m)
    layout = {k: v for k, v in (("nlist", args.nlist), ("pca", args.pca), ("m", args.m),
                                ("nprobe", args.nprobe)) if v is not None}
    t0 = time.perf_counter()
    out = index.save_folder(args.out, layout=layout, progress=True,
                            **({"shard_rows": args.shard_rows} if args.shard_rows else {}))
    opened = search.Index.load(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shards = len(opened.descriptors.files)
    print(f"wrote {shown(args.out)}: {len(opened)} x {opened.descriptors.shape[1]} float16 in "
          f"{shards} shard{'s' if shards != 1 else ''}, {size / 2**20:.1f} MB, in "
          f"{time.perf_counter() - t0:.1f} s; search {_backend_text(opened)} "
          f"({', '.join(f'{k} {v}' for k, v in opened.backend.layout.items())})")
    return 0


def _backend_text(index) -> str:
    if index.backend is None:
        return "exact"
    kind = getattr(index.backend, "kind", "")
    recall = (f", recall@10 {index.recall_at_10:.3f} against exact search on a sample"
              if index.recall_at_10 is not None else "")
    return f"{index.backend.name} {kind}".strip() + recall


def _with_backend(index, args):
    if args.backend == "index" or (args.backend == "faiss" and index.backend is not None
                                   and index.backend.name == "faiss"):
        return index
    if args.backend == "qdrant":
        return index.with_backend("qdrant", **({"url": args.qdrant_url} if args.qdrant_url
                                               else {}))
    return index.with_backend(args.backend)


def _index_and_model(args):
    """The index and the model to describe queries with (checked to match it)."""
    from scvnet_jax import images, search

    index = search.Index.load(Path(args.index).expanduser(), root=args.root)
    if args.root is None and index.root and not Path(index.root).is_dir():
        raise InputError(f"{args.index}: the indexed folder {index.root} no longer exists; "
                         "if the collection moved, give its new place with --root FOLDER")
    # queries at the index's working size; at 1024 (the default) for one at full size
    # (every index written before the size was recorded), so that an upload is bounded
    images.set_max_side(args.max_side if args.max_side is not None else
                        index.max_side or images.max_side())
    weights = args.weights or index.weights
    if not weights:
        raise InputError(f"{args.index}: the index records no weights; pass --weights")
    weights = _weights_path(weights)
    _setup(args)
    model = _load(weights)
    if index.model and search.model_key(model, index.family, index.descriptors.dtype.name,
                                        index.max_side) != index.model:
        raise InputError(f"--weights {weights}: gives other descriptors than the model "
                         f"{args.index} was built with ({index.weights})")
    return _with_backend(index, args), model


def query_command(args) -> int:
    from scvnet_jax.rerank import registry

    rerank = None if args.rerank == "none" else args.rerank
    if rerank is not None and rerank not in registry.names():
        raise InputError(f"--rerank {args.rerank}: expected none or one of "
                         f"{', '.join(registry.names())}")
    options = dict(args.option)
    if rerank is None and options:      # not silently ignored
        said = " ".join(f"{k}={v}" for k, v in options.items())
        raise InputError(f"--option {said}: options belong to a reranker: give --rerank "
                         "NAME too")
    if rerank is not None:      # a bad --option value: said now, not after the model loads
        registry.options(rerank, options)
        if registry.get(rerank).needs_weights:
            _reranker_weights(rerank, options.get("weights"), "--option weights=MODEL")
    from scvnet_jax.engine.extract import image_errors
    from scvnet_jax.images import ImageRef

    # an unreadable query is reported and the others answered; the exit status is then 2
    errors = [e if Path(q).is_file() else f"{q}: query image not found" for q, e in
              zip(args.queries, image_errors([ImageRef(q, args.box) for q in args.queries],
                                             args.workers))]
    for e in errors:
        if e is not None:
            print(f"error: {e}", file=sys.stderr)
    queries = [q for q, e in zip(args.queries, errors) if e is None]
    if not queries:
        return 2
    explain = _explain_dirs(args.explain, queries) if args.explain else None
    index, model = _index_and_model(args)
    t0 = time.perf_counter()
    options = dict(k=args.k, rerank=rerank, rerank_k=args.rerank_k, options=options,
                   batch_size=args.batch_size, bucket=args.bucket, shortlist=args.shortlist)
    if args.regions or args.box:
        found = [index.search_regions(model, q, regions=args.regions, box=args.box,
                                      **options) for q in queries]
        hits, regions = [f[0] for f in found], [f[1] for f in found]
    else:
        hits = index.search(model, queries, **options)
        regions = [[] for _ in queries]
    seconds = time.perf_counter() - t0
    why = ([_explain(model, q, hs, d, args.box) for q, hs, d in zip(queries, hits, explain)]
           if explain else [None] * len(queries))
    for q, hs, rs, ws in zip(queries, hits, regions, why):
        if hs.missing:
            print(f"warning: {q}: {len(hs.missing)} indexed file(s) no longer exist, left "
                  f"out: {', '.join(shown(p) for p in hs.missing[:3])}{' ...' if len(hs.missing) > 3 else ''}"
                  " (re-index the collection, or give --root if it moved)", file=sys.stderr)
        if args.json:
            out = {"query": shown(str(Path(q).resolve())), "rerank": args.rerank}
            if args.box:
                out["box"] = list(args.box)
            if args.regions:
                out["regions"] = [list(r) for r in rs]
            out["hits"] = [{"path": shown(h.path), "score": round(h.score, 6)} for h in hs]
            for hit, w in zip(out["hits"], ws or []):
                hit.update(inliers=w[0], explanation=shown(str(w[1])))
            if hs.missing:
                out["missing"] = [shown(p) for p in hs.missing]
            print(json.dumps(out))
            continue
        crop = f"; box {','.join(f'{v:g}' for v in args.box)}" if args.box else ""
        print(f"{shown(q)}  (rerank {args.rerank}; {len(index)} images{crop}; search "
              f"{_backend_text(index)})")
        if args.regions:
            print(f"  regions searched too: {', '.join(str(tuple(r)) for r in rs) or 'none'}"
                  " (merged by best score)")
        print(f"  {'rank':>4}  {'score':>8}  " + (f"{'inliers':>7}  " if ws else "") + "path")
        for i, h in enumerate(hs, 1):
            print(f"  {i:>4}  {h.score:8.4f}  " + (f"{ws[i - 1][0]:7d}  " if ws else "")
                  + shown(h.path))
        if ws:
            print(f"  why they matched: {shown(str(ws[0][1].parent))}/ (one picture per hit)")
    if not args.json:
        print(f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} in "
              f"{seconds:.2f} s")
    return 0 if len(queries) == len(args.queries) else 2


def _explain_dirs(folder: str, queries: list) -> list:
    """query --explain: one new sub-folder name per query (its stem; -2, -3, ... where two
    share one), checked before any work: DIR may exist, but as a folder."""
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"--explain {folder}: is a file; expected a folder (made if missing)")
    dirs, used = [], set()
    for q in queries:
        stem, n = Path(q).stem or "query", 1
        while (name := stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        used.add(name)
        dirs.append(root / name)
    return dirs


def _explain(model, query: str, hits, folder: Path, box) -> list:
    """(inliers, picture path) per hit: why it matched (rerank.spatial), drawn into
    `folder` as <rank>_<hit stem>.jpg (written whole or not at all)."""
    import cv2

    from scvnet_jax.files import atomic_write_bytes
    from scvnet_jax.images import ImageRef
    from scvnet_jax.rerank import spatial
    from scvnet_jax.search import _token_cache

    folder.mkdir(parents=True, exist_ok=True)
    feats = spatial.query_locals(model, ImageRef(query, box))
    spatial.database_locals(model, [ImageRef(h.path) for h in hits], cache_dir=_token_cache(),
                            desc=f"why the hits of {Path(query).name} matched")   # one batch
    out = []
    for rank, h in enumerate(hits, 1):
        c = spatial.explain_images(model, query, h.path, box=box, cache_dir=_token_cache(),
                                   query_features=feats)
        pic = spatial.draw(c, query, h.path, box=box,
                           title=f"#{rank} {Path(h.path).name}  score {h.score:.4f}")
        path = folder / f"{rank:0{max(2, len(str(len(hits))))}d}_{Path(h.path).stem}.jpg"
        atomic_write_bytes(path, cv2.imencode(".jpg", pic, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                           .tobytes())
        out.append((c.inliers, path))
    return out


def _reranker_weights(name: str, weights, option: str) -> None:
    """Weights a reranker needs, checked before the model loads: given, and there."""
    if not weights:
        raise InputError(f"--rerank {name} needs weights: {option} (a {name} model directory, "
                         f"e.g. written by train.py --config configs/{name}_demo.py, or an "
                         "official checkpoint)")
    if isinstance(weights, str) and not Path(weights).expanduser().exists():
        raise InputError(f"{option.split('=')[0]} {weights}: no such file or model directory")


def _similarity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not -1.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1], got "
                                         f"{text!r}")
    return v


def duplicates_command(args) -> int:
    from scvnet_jax import search

    index = search.Index.load(Path(args.index).expanduser(), root=args.root)
    index = _with_backend(index, args)
    t0 = time.perf_counter()
    groups = index.duplicates(args.threshold, k=args.k, progress=not (args.json or args.csv))
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"index": shown(str(args.index)),
                          **duplicates_json(index, groups, args.threshold, args.k)}))
        return 0
    if args.csv:
        import csv
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["group", "id", "path", "best", "weakest_link", "identical"])
        for n, g in enumerate(groups, 1):
            for i, path, best in zip(g.ids, g.paths, g.best):
                w.writerow([n, i, shown(path), f"{best:.6f}", f"{g.weakest_link:.6f}",
                            int(g.identical)])
        return 0
    dupes = sum(len(g.ids) for g in groups)
    print(f"{shown(str(args.index))}: {len(groups)} group{'s' * (len(groups) != 1)} of "
          f"near-identical photos ({dupes} of {len(index)} photos; cosine >= "
          f"{args.threshold:g} among {args.k} nearest neighbours; search "
          f"{_backend_text(index)}; {seconds:.2f} s)")
    for n, g in enumerate(groups, 1):
        kind = "the same file content" if g.identical else f"weakest link {g.weakest_link:.4f}"
        print(f"  group {n}: {len(g.ids)} photos, {kind}")
        for path, best in zip(g.paths, g.best):
            print(f"    {best:8.4f}  {shown(path)}")
    return 0


def serve_command(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
        if args.watch:
            import watchdog  # noqa: F401
    except ImportError as e:
        raise InputError(f"serve needs the app extra ({e.name} is missing): pip install "
                         "'scvnet_jax[app]'") from None
    from scvnet_jax.app import server
    from scvnet_jax.images import set_max_pixels
    from scvnet_jax.rerank import registry

    token = _token(args)                                # before the model loads
    if args.watch and Path(args.index).expanduser().is_dir():
        raise InputError(f"--watch: {args.index} is an index folder, which is not updated "
                         "in place; serve the index file with --watch (and convert it again "
                         "when it has grown)")
    sock = _listening_socket(args.host, args.port)
    if args.max_image_pixels:
        set_max_pixels(args.max_image_pixels)
    given = {}          # the rerankers' files given, loaded before the model
    for flag, (r, o) in _path_flags().items():
        value = getattr(args, flag)
        if value:
            if o.name == "weights":
                _reranker_weights(r.name, value, f"--{flag}")
            elif not Path(value).expanduser().exists():
                raise InputError(f"--{flag} {value}: no such file")
            given.setdefault(r.name, {})[o.name] = value
    rerankers = {}
    for name, opts in given.items():
        r = registry.get(name)
        if r.needs_weights and "weights" not in opts:
            said = " ".join(f"--{o.flag}" for o in r.options if o.flag and o.name in opts)
            weights = next(o.flag for o in r.options if o.name == "weights")
            raise InputError(f"{said} goes with --{weights}")
        prepared = registry.prepare(name, registry.options(name, opts))
        rerankers[name] = {key: prepared[key] for key in opts}   # the loaded objects
    index, model = _index_and_model(args)
    from scvnet_jax import search

    path = Path(args.index).expanduser()     # re-indexed: reloaded on the next request
    searcher = server.Searcher(index, model, batch_size=args.batch_size, bucket=args.bucket,
                               max_upload_bytes=args.max_upload_mb << 20,
                               shortlist=args.shortlist, reranker_options=rerankers,
                               index_path=path, load=lambda: (
                                   _with_backend(search.Index.load(path, root=args.root),
                                                 args)))
    t0 = time.perf_counter()
    there = next((i for i, p in enumerate(index.paths) if os.path.isfile(p)), 0)
    searcher.search(id=there, k=1)       # compile now, not on the first user's query
    if args.watch:
        searcher.watcher = _watcher(searcher, index, path, args)
    print(f"serving {args.index} ({len(index)} images) at http://{args.host}:{args.port}/ "
          f"(warm-up {time.perf_counter() - t0:.1f} s; API docs at /docs"
          f"{'; requests need the token' if token else ''}"
          f"{f'; following {shown(index.root)}' if args.watch else ''})", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(server.create_app(searcher, token), host=args.host,
                                      port=args.port, log_level="warning")).run(sockets=[sock])
    finally:
        if searcher.watcher is not None:
            searcher.watcher.stop()
    return 0


def _watcher(searcher, index, path: Path, args):
    """serve --watch: a started Watcher re-indexing the served index's folder into its file
    with the index's own settings (model, descriptor, dtype; faiss if it has faiss)."""
    from scvnet_jax.app.watch import Watcher
    from scvnet_jax.search import Index

    stored = Index.load(path, root=args.root)        # its own backend, not --backend's
    faiss = stored.backend is not None and stored.backend.name == "faiss"
    return Watcher(searcher, index.root, path, report=lambda text: print(text, flush=True),
                   family=index.family, weights=index.weights,
                   dtype=index.descriptors.dtype.name,
                   backend="faiss" if faiss else "exact",
                   **({"faiss_kind": stored.backend.kind} if faiss else {}),
                   batch_size=args.batch_size, bucket=args.bucket,
                   workers=args.workers).start()


TOKEN_ENV = "SCVNET_SEARCH_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.0/8, ::1):
    only then can no other machine reach a server bound to it."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _token(args) -> str | None:
    """serve's token: --token, else SCVNET_SEARCH_TOKEN, else None; one InputError for an
    empty one, and for none at all when --host is reachable from other machines."""
    token, where = args.token, "--token"
    if token is None:
        token, where = os.environ.get(TOKEN_ENV), TOKEN_ENV
    if token is not None and not token.strip():
        raise InputError(f"{where} is empty: expected a secret (e.g. from "
                         "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if token is None and not is_loopback(args.host):
        raise InputError(f"--host {args.host} can be reached from other machines: give a "
                         f"token ({TOKEN_ENV}=SECRET in the environment, or --token), which "
                         "every request must then carry")
    return token.strip() if token is not None else None


def _listening_socket(host: str, port: int):
    """A socket bound to host:port and listening (as uvicorn binds: SO_REUSEADDR), or one
    InputError: a port in use or a host that is not this machine's is said before the model
    loads."""
    import socket

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(   # IPv6 for "::1" as uvicorn
            host, port, socket.AF_INET6 if ":" in host else socket.AF_INET,
            socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # listening now, so that a request sent once "serving ..." is printed waits in the
        # backlog for uvicorn instead of being refused while it starts
        sock.listen(2048)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there "
                         f"({e.strerror or e})") from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1, 0, -1):   # "--box -5,0,10,10": argparse would take the
        if argv[i - 1] == "--box" and str(argv[i]).startswith("-"):   # value for an option;
            argv[i - 1:i + 1] = [f"--box={argv[i]}"]        # glued, it reaches the box check
    args = parser().parse_args(argv)
    commands = {"index": index_command, "query": query_command,
                "duplicates": duplicates_command, "serve": serve_command,
                "convert": convert_command}
    return cli.run(lambda: commands[args.command](args))
