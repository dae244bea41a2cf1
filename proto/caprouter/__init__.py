"""Generated wire code for the caprouter API (see proto/)."""
