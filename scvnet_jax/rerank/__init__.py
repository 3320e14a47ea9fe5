"""Rerankers of a first-stage ranking.

  superglobal   SuperGlobal reranking (MDescAug + RerankwMDA)
  cvnet         CVNet-Rerank verification (`cvnet.official`, `cvnet.blind`)
  icfrr         Iterative Cluster-Free Re-Ranking
  csa           CSA, a transformer over affinity features (`csa.load`, `csa.affinity`)
  ames          AMES, a transformer over (query, database) local descriptors (`ames.load`,
                `ames.rerank`)
  chamfer       mean best cosine of the query's local descriptors in the candidate's
  spatial       inliers of a geometric fit to mutual nearest local neighbours; why a hit
                matched (`spatial.explain_images`, `spatial.draw`)
  alpha_qe      alpha-weighted query expansion; `dba`: alpha-weighted database augmentation

`registry` names them all, with their options (`registry.names()`, `registry.rerank`).
"""
import importlib
import sys
import types

_MODULES = ("ames", "chamfer", "csa", "cvnet", "expansion", "icfrr", "registry", "spatial",
            "superglobal")
_FUNCTIONS = {"alpha_qe": "expansion", "dba": "expansion", "icfrr": "icfrr",
              "superglobal": "superglobal"}


def __getattr__(name: str):
    # loaded when first used: the registry (what eval.py's --help and config read) without
    # the rerankers' JAX code
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing submodule icfrr (superglobal) binds its function here, as it always was:
        # sj.rerank.icfrr(...) is the function, its module scvnet_jax.rerank.icfrr
        if name in ("icfrr", "superglobal") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["alpha_qe", "ames", "chamfer", "csa", "cvnet", "dba", "expansion", "icfrr", "registry",
           "spatial", "superglobal"]
