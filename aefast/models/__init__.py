"""The autoencoders of the field, built on aefast's fused modules.

Every model has ``encode(x)``, ``decode(code)`` and ``forward(x)`` (the reconstruction; mask
logits for SegNetAutoencoder and FCN; a VAEOutput for the VAEs), a ``training_loss`` used by
aefast's training loop, and a twin of the same name in :mod:`aefast.reference.models`, built from
torch.nn only, that loads the same state_dict and computes the same outputs and gradients.
"""
from aefast.models._common import ConvCode, FCNFeatures, Gaussian, VAEOutput
from aefast.models.conv import (FCN, ConvAutoencoder, ConvDenoisingAutoencoder, ConvVAE, SegNetAutoencoder,
                                segmentation_loss)
from aefast.models.mlp import (VAE, DeepAutoencoder, DenoisingAutoencoder, LinearAutoencoder,
                               StackedDenoisingAutoencoder)

MODELS = {
    "linear": LinearAutoencoder,
    "deep": DeepAutoencoder,
    "dae": DenoisingAutoencoder,
    "sdae": StackedDenoisingAutoencoder,
    "conv": ConvAutoencoder,
    "conv_dae": ConvDenoisingAutoencoder,
    "segnet": SegNetAutoencoder,
    "fcn": FCN,
    "vae": VAE,
    "conv_vae": ConvVAE,
}

__all__ = ["FCN", "MODELS", "VAE", "ConvAutoencoder", "ConvCode", "ConvDenoisingAutoencoder", "ConvVAE",
           "DeepAutoencoder", "DenoisingAutoencoder", "FCNFeatures", "Gaussian", "LinearAutoencoder",
           "SegNetAutoencoder", "StackedDenoisingAutoencoder", "VAEOutput", "segmentation_loss"]
