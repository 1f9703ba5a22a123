"""The admin side of pdp: tokens, and the tenant-isolated management of the pdp tables."""
