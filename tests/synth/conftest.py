import pytest

from tests.tiny_models import tiny_bn_cnn


@pytest.fixture
def tiny_teacher():
    return tiny_bn_cnn()
