"""Rerankers of a first-stage ranking.

  superglobal   SuperGlobal reranking (MDescAug + RerankwMDA)
  cvnet         CVNet-Rerank verification (`cvnet.official`, `cvnet.blind`)
  icfrr         Iterative Cluster-Free Re-Ranking
  csa           CSA, a transformer over affinity features (`csa.load`, `csa.affinity`)
  ames          AMES, a transformer over (query, database) local descriptors (`ames.load`,
                `ames.rerank`)
  chamfer       mean best cosine of the query's local descriptors in the candidate's
  alpha_qe      alpha-weighted query expansion; `dba`: alpha-weighted database augmentation

`registry` names them all, with their options (`registry.names()`, `registry.rerank`).
"""
from scvnet_jax.rerank import ames, chamfer, csa, cvnet, expansion, registry
from scvnet_jax.rerank.expansion import alpha_qe, dba
from scvnet_jax.rerank.icfrr import icfrr
from scvnet_jax.rerank.superglobal import superglobal

__all__ = ["alpha_qe", "ames", "chamfer", "csa", "cvnet", "dba", "expansion", "icfrr", "registry",
           "superglobal"]
