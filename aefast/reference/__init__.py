"""Pure-PyTorch twins of aefast's ops and models: the specification the kernels are held to."""
from aefast.reference import functional  # noqa: F401
