from tests.native_params import body_reading  # noqa: F401  (a fixture: the body tests run on both readings)
