from tests.users_support import one_thread  # noqa: F401  (autouse fixture)
