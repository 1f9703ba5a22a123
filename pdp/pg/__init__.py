"""PostgreSQL edges of pdp: schema, migrations, seeding, the embedded server, driver errors."""
