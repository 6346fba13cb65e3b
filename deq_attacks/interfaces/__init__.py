"""Front ends for attack libraries: the autograd module, the ART estimator, the Foolbox model."""

from deq_attacks.interfaces.art_estimator import DEQEstimator, art_device_type
from deq_attacks.interfaces.foolbox_model import DEQFoolboxModel
from deq_attacks.interfaces.whitebox import WhiteBoxModule

__all__ = ["DEQEstimator", "DEQFoolboxModel", "WhiteBoxModule", "art_device_type"]
