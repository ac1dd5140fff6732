module github.com/bulkfhir/bulkexport/examples

go 1.23.0

require (
	github.com/bulkfhir/bulkexport v0.0.0
	github.com/stretchr/testify v1.12.1
)

require (
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/sync v0.16.0 // indirect
)

replace github.com/bulkfhir/bulkexport => ../
