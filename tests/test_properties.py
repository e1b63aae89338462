"""Property-based: any shape, layout and flag combination matches eager (hypothesis draws them)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import layouts_for
from helpers import CONFIGS, DTYPES, run_against_eager


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 9))
    spatial = [draw(st.integers(1, 6)) for _ in range(ndim - 2)]
    shape = (n, c, *spatial)
    training = draw(st.booleans())
    config = draw(st.sampled_from(list(CONFIGS.values())))
    uses_batch_stats = training or not config[1]  # eval without running stats uses the batch's
    if uses_batch_stats and n * torch.Size(spatial).numel() == 1:
        n += 1  # one value per channel is refused with batch statistics (tested in test_errors)
        shape = (n, c, *spatial)
    return dict(
        shape=shape,
        layout=draw(st.sampled_from(layouts_for(shape))),
        residual=draw(st.booleans()),
        config=config,
        dtypes=draw(st.sampled_from([DTYPES["fp64"], DTYPES["fp32"]])),
        training=training,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases_match_eager(backend, case):
    run_against_eager(steps=2, **case)
