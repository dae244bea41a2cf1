import grpc
import pytest

from router.core import errors


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_code_maps_to_a_grpc_status():
    for code in errors.ErrorCode:
        assert hasattr(grpc.StatusCode, errors.GRPC_STATUS[code])


@pytest.mark.parametrize("cls,status", [
    (errors.InvalidArgument, "INVALID_ARGUMENT"),
    (errors.UnknownBackend, "INVALID_ARGUMENT"),
    (errors.NotFound, "NOT_FOUND"),
    (errors.NoEligibleBackend, "FAILED_PRECONDITION"),
    (errors.FailedPrecondition, "FAILED_PRECONDITION"),
    (errors.Unavailable, "UNAVAILABLE"),
    (errors.DeadlineExceeded, "DEADLINE_EXCEEDED"),
])
def test_mapping_table(cls, status):
    assert errors.GRPC_STATUS[cls.code] == status


def test_hierarchy_has_one_root():
    for sub in _subclasses(errors.CaprouterError):
        assert issubclass(sub, errors.CaprouterError)
    e = errors.BackendError("b", "boom")
    assert isinstance(e, errors.Unavailable) and "b" in str(e) and "boom" in str(e)
