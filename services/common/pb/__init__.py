"""Generated gRPC stubs; edit proto/ and regenerate."""
