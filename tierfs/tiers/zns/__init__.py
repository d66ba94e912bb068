"""The cold tier on zoned storage: the zone device model and its backends."""
