"""Backend choice: set_backend, get_backend, use_backend, available_backends, FUSED_RESNET_BACKEND."""

import os
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import backend as backend_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_default_is_auto_and_auto_picks_fastest_on_cpu():
    assert fused_resnet.get_backend() == "auto"
    expected = "cpu" if fused_resnet.EXTENSION_ERROR is None else "reference"
    assert fused_resnet.available_backends("cpu")[0] == expected
    assert backend_module.resolve(torch.device("cpu")).name == expected


def test_available_backends_lists_real_ones():
    names = fused_resnet.available_backends()
    assert "reference" in names and "auto" not in names
    assert ("cpu" in names) == (fused_resnet.EXTENSION_ERROR is None)


def test_set_and_use_backend_restore():
    with fused_resnet.use_backend("reference"):
        assert fused_resnet.get_backend() == "reference"
        with fused_resnet.use_backend("auto"):
            assert fused_resnet.get_backend() == "auto"
        assert fused_resnet.get_backend() == "reference"
    assert fused_resnet.get_backend() == "auto"
    fused_resnet.set_backend("reference")
    try:
        assert fused_resnet.get_backend() == "reference"
    finally:
        fused_resnet.set_backend("auto")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown fused_resnet backend 'cudnn'"):
        fused_resnet.set_backend("cudnn")
    assert fused_resnet.get_backend() == "auto"


def test_unavailable_backend_says_why():
    missing = [n for n in ("cpu", "cuda", "triton") if n not in fused_resnet.available_backends()]
    for name in missing:
        with pytest.raises(RuntimeError, match=f"backend '{name}' .* is not available on this machine: .+"):
            fused_resnet.set_backend(name)


def test_backend_that_cannot_run_the_tensor_is_an_error():
    """Never a silent fallback. The meta device stands in for a device the backend does not run."""
    x = torch.empty(2, 3, 4, device="meta")
    with fused_resnet.use_backend("reference"):
        with pytest.raises(RuntimeError, match="backend 'reference' cannot run tensors on device meta"):
            fused_resnet.functional.batch_norm_relu(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="no fused_resnet backend can run tensors on device meta"):
        fused_resnet.functional.batch_norm_relu(x, None, None, training=True)


def test_environment_variable_selects_backend():
    result = _run_python(
        "import fused_resnet; print(fused_resnet.get_backend())", FUSED_RESNET_BACKEND="reference"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "reference"


def test_bad_environment_variable_is_named():
    result = _run_python(
        "import fused_resnet, torch; fused_resnet.functional.batch_norm_relu(torch.randn(2, 3), None, None, training=True)",
        FUSED_RESNET_BACKEND="fastest",
    )
    assert result.returncode != 0
    assert "unknown fused_resnet backend 'fastest' (from the environment variable FUSED_RESNET_BACKEND)" in result.stderr


def test_import_without_extension_warns_once_and_runs_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['fused_resnet._C'] = None  # makes `import fused_resnet._C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fused_resnet, torch\n"
        "    import fused_resnet.functional\n"
        "msgs = [str(w.message) for w in caught if 'C++ extension is not available' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "names = fused_resnet.available_backends()\n"
        "assert 'reference' in names and 'cpu' not in names and 'cuda' not in names, names\n"
        "assert fused_resnet.available_backends('cpu')[0] == 'reference', names\n"
        "y = fused_resnet.nn.BatchNormAddReLU2d(3)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))\n"
        "print('ok', tuple(y.shape))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 3, 4, 4)" in result.stdout


@pytest.mark.skipif(fused_resnet.EXTENSION_ERROR is not None, reason="fused_resnet._C not built")
def test_an_extension_built_against_another_torch_is_named_with_both_versions():
    """setup.py records the torch each build of _C was built against (fused_resnet/_build_info.py);
    loading it beside another torch warns with both versions and the command that rebuilds it."""
    code = (
        "import importlib.machinery, sys, types, warnings\n"
        "info = types.ModuleType('fused_resnet._build_info')\n"
        "info.BUILDS = {importlib.machinery.EXTENSION_SUFFIXES[0]: {'torch': '2.0.0+test', 'cuda': None}}\n"
        "sys.modules['fused_resnet._build_info'] = info\n"
        "warnings.simplefilter('always')\n"
        "import torch, fused_resnet\n"
        "print('running', torch.__version__)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    running = result.stdout.split("running ")[1].strip()
    assert f"fused_resnet._C was built against torch 2.0.0+test, but torch {running} is running" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_a_build_requires_the_torch_release_it_was_built_against():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_resnet_setup", os.path.join(ROOT, "setup.py"))
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # not as __main__: nothing is built
    assert setup_module.torch_requirement("2.14.1+cu130") == "torch==2.14.1"
    assert setup_module.torch_requirement("2.13.0") == "torch==2.13.0"
