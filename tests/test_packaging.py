"""The installed distribution contains every package (a package without an
__init__.py is silently left out by find_packages)."""

import os

import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_folder_is_a_package():
  found = set(setuptools.find_packages(REPO, include=['pgf', 'pgf.*']))
  expected = set()
  for root, dirs, files in os.walk(os.path.join(REPO, 'pgf')):
    dirs[:] = [d for d in dirs if not d.startswith(('.', '__'))]
    if any(f.endswith('.py') for f in files):
      expected.add(os.path.relpath(root, REPO).replace(os.sep, '.'))
  assert expected <= found, expected - found
  assert {'pgf', 'pgf.sparsity', 'pgf.models', 'pgf.data', 'pgf.configs',
          'pgf.tasks'} <= found
  # No top-level package other projects could collide with.
  assert not {p for p in found if not p.startswith('pgf')}


def test_configs_link_points_into_the_package():
  link = os.path.join(REPO, 'configs')
  assert os.path.islink(link)
  assert os.path.realpath(link) == os.path.join(REPO, 'pgf', 'configs')
