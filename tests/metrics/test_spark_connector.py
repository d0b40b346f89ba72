"""The Spark detector's parts that need no broker: the Kafka connector pinned to the installed
pyspark, and the settings mapped to the Java Kafka client's options (SASL/SSL included)."""

from __future__ import annotations

import re
import tomllib

import pytest
from helpers import REPO_ROOT, as_settings

from services.detector.spark.connector import (
    POM,
    artifact_name,
    check_versions,
    connector_jars,
    installed_versions,
    pom_versions,
)
from services.detector.spark.query import jaas_config, kafka_options


def test_the_pom_pins_the_spark_version_pyproject_pins_and_the_installed_pyspark_has():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {re.sub(r"\s", "", r) for extra in ("spark", "test") for r in project["optional-dependencies"][extra]
            if r.startswith("pyspark")}
    spark, scala = pom_versions()
    assert pins == {f"pyspark=={spark}"}
    assert installed_versions() == (spark, scala)
    assert check_versions() == f"org.apache.spark:spark-sql-kafka-0-10_{scala}:{spark}"


def test_a_pom_for_another_spark_is_refused_with_both_versions_named(tmp_path):
    other = tmp_path / "pom.xml"
    other.write_text(POM.read_text().replace(f"<spark.version>{pom_versions()[0]}<", "<spark.version>3.5.1<"))
    with pytest.raises(RuntimeError, match=r"Spark 3\.5\.1 .* installed pyspark is Spark " + re.escape(pom_versions()[0])):
        check_versions(other)


def test_the_connector_jars_leave_out_what_pyspark_ships():
    jars = connector_jars()  # fetched by `make test` (spark-detect --fetch-jars)
    names = {artifact_name(j) for j in jars}
    assert {"spark-sql-kafka-0-10_2.13", "spark-token-provider-kafka-0-10_2.13", "kafka-clients"} <= names
    assert not names & {"scala-library", "hadoop-client-api", "hadoop-client-runtime", "slf4j-api", "snappy-java"}
    assert artifact_name(jars[0].with_name("kafka-clients-3.9.2.jar")) == "kafka-clients"


def test_plain_settings_become_the_java_clients_options():
    options = kafka_options(as_settings({"bootstrap_servers": "k1:9092,k2:9092"}))
    assert options == {"kafka.bootstrap.servers": "k1:9092,k2:9092", "kafka.security.protocol": "PLAINTEXT"}


def test_sasl_ssl_settings_become_a_jaas_line_and_a_pem_truststore():
    settings = as_settings({"bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL",
                            "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "detector",
                            "sasl_password": 'p"a\\ss', "ssl_ca_location": "/etc/ca.pem",
                            "spark_kafka_options": {"kafka.client.rack": "a", "kafka.security.protocol": "SSL"}})
    options = kafka_options(settings)
    assert options["kafka.sasl.mechanism"] == "SCRAM-SHA-512"
    assert options["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="detector" '
        'password="p\\"a\\\\ss";')
    assert options["kafka.ssl.truststore.type"] == "PEM"
    assert options["kafka.ssl.truststore.location"] == "/etc/ca.pem"
    assert options["kafka.client.rack"] == "a"
    assert options["kafka.security.protocol"] == "SSL", "spark_kafka_options win"


def test_oauthbearer_needs_its_own_jaas_line():
    settings = as_settings({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"})
    assert jaas_config(settings) is None
    assert "kafka.sasl.jaas.config" not in kafka_options(settings)
