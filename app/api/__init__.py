"""HTTP layer: routes, schemas, dependencies and the error mapping. It never touches tensors."""
