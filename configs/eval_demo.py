"""The bundled demo model on the demo benchmark: the first command of the README.

Command (no download; the benchmark is generated on first use into
<cache_dir>/demo_benchmark from photographs that ship with scikit-image):

    python -m scvnet_jax.eval --dataset demo

Hardware and time: 2 CPU cores (AMD EPYC, the CI machine type), about 3.5 minutes with an
empty cache (most of it CVNet reranking of the top 100 for 30 queries).
Expected result (mAP %, Easy / Medium / Hard; tests/e2e/test_demo.py checks the margins):

    cvnet_global        67.68  53.61  24.55
    cvnet_rerank        70.23  55.18  23.65   (top-100, official protocol)
    superglobal_global  70.99  55.27  24.35
    superglobal_rerank  62.75  48.82  18.21

30 query instances and 210 database images of 160 px: one 256 x 256 size bucket holds
every image, so few compilations.
"""
from scvnet_jax.evaluation.config import default_config


def get_config():
    c = default_config()
    c.dataset = "demo"
    c.data_dir = ""          # "" = <cache_dir>/demo_benchmark (built there on first use)
    c.weights = ""           # "" = the bundled demo model (scvnet_jax/assets/demo_model)
    c.bucket = 256           # every demo image fits one 256 x 256 bucket: few compilations
    c.feature_bucket = 16
    c.batch_size = 16
    return c
