import pytest
from support import PrivateCluster


@pytest.fixture(scope="session")
def cluster():
    """One three-node cluster for the env: starting one takes about 30 s. A test that
    kills a node starts it again before it ends."""
    cluster = PrivateCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
