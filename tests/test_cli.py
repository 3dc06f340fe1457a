"""cli: the user errors and the one integer-setting check."""

import numpy as np
import pytest

from t5dual import cli, trainer


def configured(size=1):
  """A stand-in for a function gin configures."""


@pytest.mark.parametrize('value', [1, 7, np.int32(3), np.int64(2)])
def test_check_int_accepts_python_and_numpy_integers(value):
  cli.check_int(configured, 'size', value, minimum=1)


@pytest.mark.parametrize('value,minimum,wanted', [
    (0, 1, 'a positive integer'), (-1, 0, 'a non-negative integer'), (3, 4, 'an integer >= 4'),
    (True, 1, 'a positive integer'), (2.0, None, 'an integer'), ('2', 0, 'a non-negative integer'),
    (None, 1, 'a positive integer')])
def test_check_int_refuses_with_the_owner_and_parameter_named(value, minimum, wanted):
  with pytest.raises(cli.ParameterError) as e:
    cli.check_int(configured, 'size', value, minimum=minimum)
  assert str(e.value) == (f'{configured.__module__}.configured.size: must be {wanted}, '
                          f'got {value!r}')
  assert (e.value.owner, e.value.param) == (configured, 'size')
  assert isinstance(e.value, cli.ConfigError) and isinstance(e.value, cli.UserError)


def test_trainer_parameter_error_is_the_cli_class():
  assert trainer.ParameterError is cli.ParameterError
  with pytest.raises(cli.ParameterError, match=r'^trainer.TrainerConfig.prefetch: must be a '
                     r'non-negative integer, got -1$'):
    trainer.TrainerConfig(prefetch=-1)
