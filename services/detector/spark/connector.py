"""Spark's Kafka connector (spark-sql-kafka and what it brings that pyspark does not ship), fetched
from Maven Central through the repository's spark/pom.xml into <ANOMSTREAM_HOME>/spark/jars.

The connector must be built for the installed pyspark's Spark and Scala versions: the pom pins
them, and a mismatch is refused here with both versions named rather than failing in the JVM."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from shared.config import anomstream_home
from shared.maven import copy_dependencies

# A developer tool that runs from a checkout, like the local broker's broker/pom.xml.
POM = Path(__file__).resolve().parents[3] / "spark" / "pom.xml"
CONNECTOR = "spark-sql-kafka-0-10"
_VERSIONED = re.compile(r"^(?P<name>.+?)-(?P<version>\d+(\.\d+)+.*)\.jar$")  # name-1.2.3[-x].jar


def pom_versions(pom: Path = POM) -> tuple[str, str]:
    """(Spark version, Scala binary version) the pom pins."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    props = ET.parse(pom).getroot().find("m:properties", ns)
    return props.find("m:spark.version", ns).text.strip(), props.find("m:scala.binary.version", ns).text.strip()


def installed_versions() -> tuple[str, str]:
    """(Spark version, Scala binary version) of the installed pyspark, read off its jars."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    core = sorted(jars.glob("spark-core_*.jar"))
    if not core:
        raise RuntimeError(f"pyspark {pyspark.__version__} has no spark-core jar in {jars}")
    scala = core[0].name.removeprefix("spark-core_").split("-")[0]
    return pyspark.__version__, scala


def check_versions(pom: Path = POM) -> str:
    """The Maven coordinates of the connector; raises if they do not match the installed pyspark."""
    wanted, installed = pom_versions(pom), installed_versions()
    if wanted != installed:
        raise RuntimeError(f"{pom} pins Spark {wanted[0]} / Scala {wanted[1]} but the installed pyspark is "
                           f"Spark {installed[0]} / Scala {installed[1]}: install pyspark=={wanted[0]} "
                           "(pip install 'anomstream[spark]') or change the pom")
    return f"org.apache.spark:{CONNECTOR}_{wanted[1]}:{wanted[0]}"


def artifact_name(jar: Path) -> str:
    match = _VERSIONED.match(jar.name)
    return match["name"] if match else jar.stem


def connector_jars(folder: Path | None = None, pom: Path = POM) -> list[Path]:
    """The jars to put on Spark's classpath (spark.jars): the pom's runtime dependencies less those
    pyspark ships already (another copy of scala-library or hadoop on the classpath would clash)."""
    import pyspark

    check_versions(pom)
    folder = folder or anomstream_home() / "spark" / "jars"
    if not any(folder.glob(f"{CONNECTOR}_*.jar")):
        copy_dependencies(pom, folder)
    shipped = {artifact_name(j) for j in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return sorted(j for j in folder.glob("*.jar") if artifact_name(j) not in shipped)
