from ep_plugins import note

note("import ep_plugins.general")


def hello():
    note("call ep_hello")


def raises():
    raise RuntimeError("ep_raises fails on purpose")
