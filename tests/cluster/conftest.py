import pytest
from stack import PrivateCluster


@pytest.fixture(scope="module")
def cluster():
    cluster = PrivateCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
