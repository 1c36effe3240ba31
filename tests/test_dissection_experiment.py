"""Argument checks of the dissection experiment (they run before any data is read)."""
import pytest

from experiments import dissection


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet20", "--advtrain-models", "resnet32"], "must be a subset of --models"),
    (["--models", "resnet20,vgg16"], "unknown model 'vgg16'"),
    (["--advtrain-epochs", "-1"], "--advtrain-epochs must be >= 0"),
])
def test_bad_arguments_end_as_one_usage_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dissection.main(["--out", str(tmp_path / "out")] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked
