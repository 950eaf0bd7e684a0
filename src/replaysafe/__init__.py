"""replaysafe: business-level exactly-once effects on top of at-least-once brokers."""
