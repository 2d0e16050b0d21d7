"""The saliency cards (docs/methods/NAME.md): generated from the code and the stored results, and the committed
ones are what the generator makes of the committed results."""
import json
import os

import pytest

from sgrad import cards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name', cards.card_names())
def test_the_committed_card_is_the_one_the_stored_results_make(name):
    """Regenerate the card from the committed results.md files; a results change without `python
    evaluate_saliency.py --cards` fails here."""
    with open(os.path.join(ROOT, cards.CARDS_DIR, name + '.md'), encoding='utf-8') as f:
        assert f.read() == cards.card(ROOT, name)


def test_the_committed_comparison_is_the_one_the_stored_results_make():
    with open(os.path.join(ROOT, cards.CARDS_DIR, 'README.md'), encoding='utf-8') as f:
        assert f.read() == cards.comparison(ROOT)


def test_a_card_shows_the_methods_rows_of_every_stored_table_by_section(tmp_path):
    folder = tmp_path / 'docs' / 'evaluation'
    folder.mkdir(parents=True)
    (folder / 'results.md').write_text('\n'.join([
        '### Cascading randomization: Spearman |map|', '', '| method | fc | fc, next image (control) |',
        '|---|---|---|', '| gradient | 0.5 | 0.1 |', '| deeplift | 0.7 | 0.2 |', '', '_sanity: 2 images, 3 s_', '',
        '### ROAD over 2 images', '', '| pixel order | MoRF |', '|---|---|', '| deeplift | 0.4 |',
        '| deeplift (signed) | 0.6 |', '| random (baseline) | 0.5 |', '', '_road: 2 images, 1 s_', '']))
    text = cards.card(str(tmp_path), 'deeplift')
    sensitivity, faithfulness = text.split('## Sensitivity')[1].split('## Faithfulness')
    assert '| deeplift | 0.7 | 0.2 |' in sensitivity and '(CIFAR-10, CifarNet; sanity: 2 images, 3 s)' in sensitivity
    assert '| deeplift | 0.4 |\n| deeplift (signed) | 0.6 |' in faithfulness and 'random' not in faithfulness
    assert 'gradient |' not in text and '`baseline=None`' in text and 'the class score, not the loss' in text
    assert 'Not measured yet.' not in sensitivity.split('**')[0] + faithfulness
    assert 'Not measured yet.' in cards.card(str(tmp_path / 'nothing'), 'deeplift')
    row = next(line for line in cards.comparison(str(tmp_path)).splitlines() if line.startswith('| [deeplift]'))
    assert row.startswith('| [deeplift](deeplift.md) | 0.7 (0.2) | - | - |')


def test_the_readme_links_every_card():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    assert all('(docs/methods/%s.md)' % name in readme for name in cards.card_names())


def test_every_method_has_measured_cross_checks_of_tests_that_exist():
    """The record that the cards read (docs/methods/cross_checks.json, written by `pytest -m cross_check
    --record-checks`): every method has at least one measured difference within its bound, and each recorded
    test is still in the test suite, still marked a cross check of those methods."""
    for name in cards.card_names():
        checks = cards.cross_checks(ROOT, name)
        assert checks, '%s has no recorded cross check' % name
        assert all(entry['difference'] < entry['bound'] for _, entry in checks)
    with open(os.path.join(ROOT, cards.CROSS_CHECKS), encoding='utf-8') as f:
        record = json.load(f)
    for test, entry in record.items():
        path, function = test.split('::')
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            source = f.read()
        function = function.split('[')[0]
        assert 'def %s(' % function in source, test
        head = source[:source.index('def %s(' % function)].rsplit('\n\n\n', 1)[-1]  # its decorators
        assert all("'%s'" % method in head for method in entry['methods']), test
