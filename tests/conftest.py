import pytest
from support import Downstream, Stack, delete_queues, unique_service


@pytest.fixture(scope="module")
def stack():
    stack = Stack()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def downstream():
    with Downstream() as server:
        yield server


@pytest.fixture(scope="module")
def service():
    name = unique_service()
    yield name
    delete_queues(f"{name}_requests")
