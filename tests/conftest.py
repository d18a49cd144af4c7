import pytest
import torch

from tiltgen.core import DiscreteVP, RectifiedFlow, VPCosine, VPLinear

ALL_SCHEDULES = {
    "vp-linear": VPLinear(),
    "vp-cosine": VPCosine(),
    "vp-discrete-sd": DiscreteVP.from_diffusers("scaled_linear"),
    "flow": RectifiedFlow(),
    "flow-shift3": RectifiedFlow(shift=3.0),
}


@pytest.fixture(params=sorted(ALL_SCHEDULES))
def schedule(request):
    return ALL_SCHEDULES[request.param]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
