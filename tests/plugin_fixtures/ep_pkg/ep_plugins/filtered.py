from ep_plugins import note

note("import ep_plugins.filtered")


def register():
    note("call ep_filtered")
