"""``lbctl``: the admin CLI of the control plane."""
