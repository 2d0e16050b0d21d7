"""`pip install .` gives the API to code in any folder: the README's Python example, run from a temporary
folder outside the clone against a non-editable install of the package, computes the map the clone computes (to rounding)."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_example():
    """The README's first Python block (the API example)."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        return re.search(r'```python\n(.*?)```', f.read(), re.S).group(1)


def test_the_readme_example_runs_from_any_folder_on_an_installed_package(tmp_path):
    source, site = tmp_path / 'source', tmp_path / 'site'
    source.mkdir()  # a copy of the clone's package: the build writes build/ and .egg-info beside its source
    for name in ('pyproject.toml', 'README.md', 'requirements.txt'):
        shutil.copy(os.path.join(ROOT, name), str(source))
    shutil.copytree(os.path.join(ROOT, 'sgrad'), str(source / 'sgrad'), ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                    '--target', str(site), str(source)], check=True, cwd=str(tmp_path))
    assert not (site / 'model.py').exists()  # no module with a generic name on the user's path
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    code = readme_python_example() + '\nimport sgrad\nprint(sgrad.__file__)\nnp.save("map.npy", saliency)\n'
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, '-c', code], cwd=str(elsewhere), env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(site) in run.stdout.splitlines()[-1]  # the installed copy, not the clone's
    installed_map = np.load(str(elsewhere / 'map.npy'))

    namespace = {}
    exec(readme_python_example(), namespace)  # the same example in this process, on the clone's package
    # the install has no compiled kernels (`python -m sgrad.native` was not run there): equal to rounding
    np.testing.assert_allclose(installed_map, namespace['saliency'], rtol=0, atol=1e-5 * installed_map.max())
    assert installed_map.shape == (32, 32) and installed_map.min() >= 0 and installed_map.max() > 0
