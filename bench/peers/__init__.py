"""Other gateways measured next to aioproxy by `bench/run.py --peers`."""
