"""Drop-in modules over aefast.functional; parameters named, shaped and initialised like torch.nn's."""
from aefast.nn.batch_norm_act import BatchNormAct2d
from aefast.nn.conv_bn_pool import ConvBNPool2d
from aefast.nn.conv_pool import ConvPool2d
from aefast.nn.loss import Corruption, ReconstructionLoss
from aefast.nn.unpool_deconv import ConvTransposeAct2d, UnpoolConvTranspose2d

__all__ = ["BatchNormAct2d", "ConvBNPool2d", "ConvPool2d", "ConvTransposeAct2d", "Corruption", "ReconstructionLoss", "UnpoolConvTranspose2d"]
