"""The OpenStack side of the testbed: one module per API (keystone, nova, neutron, glance, blazar, refapi),
the static catalog of sites and hardware (`catalog`) and the shared behaviour (`model`)."""
