"""torch.library glue per op family: fake functions, autograd formulas, Triton twins."""
from aefast.ops import batch_norm_act  # noqa: F401
from aefast.ops import conv_bn_pool  # noqa: F401
from aefast.ops import conv_pool  # noqa: F401
from aefast.ops import conv_transpose_act  # noqa: F401
from aefast.ops import pool_index  # noqa: F401
from aefast.ops import recon_loss  # noqa: F401
from aefast.ops import unpool_deconv  # noqa: F401
