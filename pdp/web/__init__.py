"""The aiohttp application: check API handlers, operations endpoints and the OpenAPI document."""
